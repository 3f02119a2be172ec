"""bench/scale.py: the tools table, the opened gates edgeq accepts, and the BENCHMARKS.md table."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import scale  # noqa: E402

from edgeq.profiles import load_profile, parse_setting  # noqa: E402

TRACEBACK = """Traceback (most recent call last):
google.protobuf.message.EncodeError: Failed to serialize proto

The above exception was the direct cause of the following exception:

RuntimeError: The post-processing of the ONNX export failed."""


def _row(tool: str, status: str, **kw) -> dict:
    return {"model": "llama-3.2-1b", "params": 1_235_814_400, "tool": tool, "stage": "s", "status": status,
            "date": "2026-11-30 16:24 UTC", "machine": "cpu, 2 cores", "load_average": [1.5, 4.0]} | kw


def test_the_bench_opens_llm_gates_that_the_android_profile_accepts():
    sets = [scale.OPEN_GATES[i + 1] for i, a in enumerate(scale.OPEN_GATES) if a == "--set"]
    llm = load_profile("android-arm64", overrides=dict(parse_setting(s) for s in sets)).llm
    assert llm.max_ppl_increase >= 1000 and llm.min_top1_agreement == 0
    assert len({t.key for t in scale.TOOLS}) == len(scale.TOOLS)


def test_the_table_keeps_the_latest_row_per_tool_and_names_a_failures_cause():
    rows = [_row("edgeq export", "failed (exit 1)", wall_s=10.0, peak_rss_gb=9.0, bytes_per_param=7.3,
                 stderr_tail="x"),
            _row("edgeq export", "failed (exit 1)", wall_s=526.0, peak_rss_gb=19.27, bytes_per_param=15.6,
                 stderr_tail=TRACEBACK),
            _row("mobius-onnx", "skipped: /work/venvs/mobius is not ready (no READY file)"),
            _row("other", "killed at 20.1 GB (cap 20 GB) after 99 s", wall_s=99.0, peak_rss_gb=20.1,
                 bytes_per_param=16.3)]
    lines = scale.table(rows).splitlines()
    assert len(lines) == 2 + 3
    assert lines[2] == ("| llama-3.2-1b | 1.24 B | edgeq export | s | 526 | 19.27 | 15.6 | - | failed (exit 1): "
                        "`google.protobuf.message.EncodeError: Failed to serialize proto` -> `RuntimeError: The "
                        "post-processing of the ONNX export failed.` |")
    assert lines[3].endswith("| - | - | - | - | skipped: /work/venvs/mobius is not ready (no READY file) |")
    assert "| 99 | 20.10 | 16.3 | - | killed at 20.1 GB (cap 20 GB) after 99 s |" in lines[4]


def test_the_table_gives_an_ok_rows_output_size_and_each_tools_own_note_once():
    rows = [_row("w", "ok", wall_s=69.0, peak_rss_gb=0.25, bytes_per_param=0.2, output_gb=2.475, tool_note="streamed"),
            _row("w", "ok", model="qwen2.5-3b", wall_s=165.0, peak_rss_gb=0.24, bytes_per_param=0.1,
                 output_gb=6.18, tool_note="streamed")]
    text = scale.table(rows)
    assert "| 69 | 0.25 | 0.2 | 2.48 | ok |" in text and text.count("- w: streamed") == 1
    assert "1-min load average 1.5-4.0" in scale.section(rows) and "no accuracy meaning" in scale.section(rows)


def test_stage_seconds_from_edgeq_progress_lines():
    progress = ("[   2.5s] check: inputs\n           measured layer 1/2\n[  10.0s] measure: 2 layers\n"
                "[  40.0s] quantize: INT4\n[  55.5s] evaluate: 16 windows\n")
    assert scale.stage_seconds(progress, 70.0) == {"start": 2.5, "check": 7.5, "measure": 30.0, "quantize": 15.5,
                                                   "evaluate": 14.5}
    assert scale.stage_seconds("no progress here", 3.0) == {}


def test_stage_peaks_split_the_sampled_series_at_the_progress_lines():
    progress = "[   2.0s] check: inputs\n[  10.0s] measure: 2 layers\n[  40.0s] quantize: INT4\n"
    series = [(0.5, 1e8), (3.0, 5e8), (9.9, 7e8), (10.0, 2e9), (39.0, 3e9), (41.0, 2.5e9), (60.0, 1e9)]
    assert scale.stage_peaks(progress, series) == {"start": 0.1, "check": 0.7, "measure": 3.0, "quantize": 2.5}
    assert scale.stage_peaks("", series[:2]) == {"start": 0.5}


def test_the_stage_lines_carry_each_stages_peak_where_recorded():
    rows = [_row("edgeq", "ok", wall_s=100.0, peak_rss_gb=3.0, bytes_per_param=2.4, output_gb=0.9,
                 stages={"start": 2.0, "measure": 60.0, "quantize": 38.0},
                 stage_peak_gb={"start": 0.4, "measure": 2.87, "quantize": 3.0})]
    assert "measure 60 s / 2.87 GB, quantize 38 s / 3.00 GB" in scale.table(rows)
