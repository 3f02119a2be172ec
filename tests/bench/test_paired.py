"""bench/bench.py's same-process rounds for encoders (child_paired) and bench/runs.py's paired ratios: every variant
timed once per round in one process, and each row's figure against edgeq taken round by round."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

import bench  # noqa: E402
import runs  # noqa: E402
from tiny_models import tiny_onnx_encoder, write_tokenizer  # noqa: E402
from variants import BuildContext, Built  # noqa: E402


def test_paired_ratios_are_taken_round_by_round():
    times = {"edgeq": [1.0, 2.0, 1.0], "peer": [1.5, 2.0, 0.9]}
    r = runs.paired_ratios(times, "edgeq")
    assert r["edgeq"] == runs.Spread(1.0, 1.0, 1.0, 3, 0)
    # rounds: 1.5 / 1.0, 2.0 / 2.0, 0.9 / 1.0 (round 2's slow machine cancels out; unpaired medians would say 1.5x)
    assert r["peer"] == runs.Spread(pytest.approx(1.0), pytest.approx(0.9), pytest.approx(1.5), 3, 0)


def test_paired_ratios_refuse_a_variant_with_missing_rounds():
    with pytest.raises(ValueError, match="peer: 2 rounds, edgeq: 3"):
        runs.paired_ratios({"edgeq": [1.0, 1.0, 1.0], "peer": [1.0, 1.0]}, "edgeq")


def test_child_paired_times_every_variant_once_per_round_in_one_process(tmp_path, monkeypatch):
    fp32 = tmp_path / "fp32"
    fp32.mkdir()
    vocab = write_tokenizer(fp32)
    built = {name: Built(tiny_onnx_encoder(tmp_path / f"{name}.onnx", seed=i, vocab=vocab), tmp_path, "")
             for i, name in enumerate(("FP32", "edgeq", "peer"))}
    ctx = BuildContext(threads=1, model_dir=fp32, kind="encoder", work=tmp_path, fp32_dir=fp32)
    monkeypatch.setattr(bench, "PAIRED_ROUNDS", 3)
    order = []
    timer = bench_timer_spy(monkeypatch, order)
    times = bench.child_paired(ctx, built)
    assert {n: len(t) for n, t in times.items()} == {"FP32": 3, "edgeq": 3, "peer": 3}
    assert all(t > 0 for ts in times.values() for t in ts)
    assert order == [name for _, name in runs.schedule(list(built), 3)]  # runs.schedule's rotating order
    assert timer.sessions == 3  # one session per variant for all rounds
    meta = bench.paired_meta(times, "edgeq")
    assert meta["rounds"] == 3 and meta["vs_reference"]["edgeq"]["median"] == 1.0
    table = bench.paired_table(meta, 1)
    assert table[-3].startswith("| FP32 | ") and table[-2].endswith("| — |")


def bench_timer_spy(monkeypatch, order: list[str]):
    """Records which model each turn timed, and how many sessions were opened."""
    from edgeq import speed

    real = speed.EncoderTimer

    class Spy(real):
        sessions = 0

        def __init__(self, model_path, *a, **kw):
            super().__init__(model_path, *a, **kw)
            Spy.sessions += 1
            self.name = Path(model_path).stem

        def ms_per_sentence(self, warmup: int = 8) -> float:
            order.append(self.name)
            return super().ms_per_sentence(warmup)

    monkeypatch.setattr(speed, "EncoderTimer", Spy)
    return Spy
