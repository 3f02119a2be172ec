"""edgeq.progress: stage, step and heartbeat lines on the given stream; QUIET prints nothing."""

from __future__ import annotations

import io
import re
import threading
import time

import edgeq.progress as progress_mod
from edgeq.progress import QUIET, Progress


def test_stage_and_step_lines_go_to_the_given_stream(monkeypatch, capsys):
    clock = iter([100.0, 112.34, 113.0, 150.0])
    monkeypatch.setattr(progress_mod.time, "monotonic", lambda: next(clock))
    out = io.StringIO()
    p = Progress(stream=out)  # t0 = 100.0
    p.stage("export", "tiny-bert (BertModel, task feature-extraction)")
    p.step("calibration batch", 2, 8)
    p.stage("done")
    assert out.getvalue().splitlines() == [
        "[  12.3s] export: tiny-bert (BertModel, task feature-extraction)",
        "[  13.0s]   calibration batch 2/8",  # indented: not a stage line (bench/scale.py splits at those)
        "[  50.0s] done",  # no detail: no colon
    ]
    assert capsys.readouterr() == ("", "")  # nothing on stdout or stderr


def test_a_step_counter_prints_at_most_once_a_second_and_always_its_first_and_last(monkeypatch):
    times = [0.0] + [0.3 * i for i in range(1, 11)] + [3.05, 3.1]
    clock = iter(times)
    monkeypatch.setattr(progress_mod.time, "monotonic", lambda: next(clock))
    out = io.StringIO()
    p = Progress(stream=out)
    for i in range(1, 11):  # one tensor every 0.3 s
        p.step("dequantized tensor", i, 10)
    p.step("evaluation window", 2, 4)  # another counter: its first line always comes
    p.step("evaluation window", 3, 4)
    assert [line.split("]", 1)[1].strip() for line in out.getvalue().splitlines()] == [
        "dequantized tensor 1/10", "dequantized tensor 5/10", "dequantized tensor 9/10", "dequantized tensor 10/10",
        "evaluation window 2/4"]


def test_heartbeat_fills_a_silent_stretch_and_stops_when_closed():
    out = io.StringIO()
    with Progress(stream=out, heartbeat=0.2) as p:
        p.stage("export", "optimum-onnx")
        time.sleep(0.75)
    lines = out.getvalue().splitlines()
    assert lines[0].endswith("] export: optimum-onnx")
    beats = lines[1:]
    assert 1 <= len(beats) <= 4, lines  # one every 0.2 s, give or take a loaded machine
    assert all(re.fullmatch(r"\[\s*\d+\.\ds\]   export: \d+ s in this stage", b) for b in beats), beats
    time.sleep(0.5)
    assert out.getvalue().splitlines() == lines  # closed: the thread is gone
    assert not any(t.name == "edgeq-progress" for t in threading.enumerate())


def test_default_stream_is_stderr(capsys):
    p = Progress()
    p.stage("optimize")
    p.step("sensitivity of linear layer", 1, 12)
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 2
    assert re.fullmatch(r"\[\s*\d+\.\ds\] optimize", lines[0])
    assert re.fullmatch(r"\[\s*\d+\.\ds\]   sensitivity of linear layer 1/12", lines[1])


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
