"""edgeq.progress: stage and step lines on the given stream; QUIET prints nothing."""

from __future__ import annotations

import io
import re

import edgeq.progress as progress_mod
from edgeq.progress import QUIET, Progress


def test_stage_and_step_lines_go_to_the_given_stream(monkeypatch, capsys):
    clock = iter([100.0, 112.34, 150.0])
    monkeypatch.setattr(progress_mod.time, "monotonic", lambda: next(clock))
    out = io.StringIO()
    p = Progress(stream=out)  # t0 = 100.0
    p.stage("export", "tiny-bert (BertModel, task feature-extraction)")
    p.step("calibration batch", 2, 8)
    p.stage("done")
    assert out.getvalue().splitlines() == [
        "[  12.3s] export: tiny-bert (BertModel, task feature-extraction)",
        "           calibration batch 2/8",
        "[  50.0s] done",  # no detail: no colon
    ]
    assert capsys.readouterr() == ("", "")  # nothing on stdout or stderr


def test_default_stream_is_stderr(capsys):
    p = Progress()
    p.stage("optimize")
    p.step("sensitivity of linear layer", 1, 12)
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 2
    assert re.fullmatch(r"\[\s*\d+\.\ds\] optimize", lines[0])
    assert lines[1].strip() == "sensitivity of linear layer 1/12"


def test_disabled_progress_prints_nothing(capsys):
    out = io.StringIO()
    p = Progress(enabled=False, stream=out)
    p.stage("export", "detail")
    p.step("batch", 1, 2)
    assert out.getvalue() == ""
    assert capsys.readouterr() == ("", "")


def test_quiet_prints_nothing(capsys):
    assert QUIET.enabled is False
    QUIET.stage("export", "detail")
    QUIET.step("batch", 1, 2)
    assert capsys.readouterr() == ("", "")


def test_a_closed_stream_silences_progress_and_the_work_goes_on():
    """Progress is advisory: its reader gone (`edgeq export ... 2>&1 | head`), an export must not stop midway."""

    class ClosedPipe(io.StringIO):
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

    p = Progress(stream=ClosedPipe())
    p.stage("export", "detail")  # raises nothing
    assert p.enabled is False
    p.step("batch", 1, 2)
