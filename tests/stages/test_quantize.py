"""edgeq.stages.quantize: per-layer sensitivity, QDQ rewrite of a plan, promotion loop and its stopping rule."""

from __future__ import annotations

import dataclasses
import io
import math
import re

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from edgeq.metrics import EncoderAccuracy, compare
from edgeq.modelsource import inspect_model_dir
from edgeq.policy import PrecisionPlan, decide_precision
from edgeq.profiles import load_profile
from edgeq.progress import Progress
from edgeq.runtime import embed, session
from edgeq.stages.calibrate import calibrate
from edgeq.stages.export import export
from edgeq.stages.optimize import optimize
from edgeq.policy import selection_met, selection_targets
from edgeq.policy.encoder import promotion_steps, unmet_targets
from edgeq.stages.quantize import apply_plan, measure_sensitivity, quantize
from edgeq.textdata import CALIBRATION_FILE, EVALUATION_FILE, load_texts
from tiny_models import tiny_bert_with_outliers

N_CAL = 16
SENS_SAMPLES = 8
SEQ_LEN = 64
N_LINEAR = 12  # 6 per layer, 2 layers
# Measured: every linear layer at static int8 keeps the tiny random BERT's pooled embeddings at cosine 0.99999982
# (min over 16 evaluation texts) against FP32: random init gives near-Gaussian activations without the outlier
# channels of trained models, so a uint8 grid over the calibrated range loses almost nothing. 0.9999 leaves a
# 500x margin on the loss and still fails a wrong scale, zero point or channel axis (those give cosines < 0.99).
MIN_POOLED_COSINE = 0.9999


def with_quantization(profile, **kw):
    return dataclasses.replace(profile, quantization=dataclasses.replace(profile.quantization, **kw))


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("quantize-work")


@pytest.fixture(scope="module")
def optimized(tiny_bert_dir, work):
    return optimize(export(inspect_model_dir(tiny_bert_dir), work), work)


@pytest.fixture(scope="module")
def tokenizer(optimized):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(optimized.exported.tokenizer_dir), local_files_only=True)


@pytest.fixture(scope="module")
def profile():
    # smoothing off: these tests are about the search's mechanics, and the tiny random BERT's texts embed so alike
    # (cosine ~0.99999 apart) that smoothing's last-bit changes flip a retrieval neighbour (top-1 1.0 -> 0.9375)
    return with_quantization(load_profile("android-arm64"), calibration_seq_len=SEQ_LEN,
                             sensitivity_samples=SENS_SAMPLES, smoothing=False)


@pytest.fixture(scope="module")
def texts() -> tuple[str, ...]:
    return load_texts(CALIBRATION_FILE).head(N_CAL)


@pytest.fixture(scope="module")
def stats(optimized, tokenizer, texts, profile):
    return calibrate(optimized, tokenizer, texts, profile.quantization, "mean")


@pytest.fixture(scope="module")
def model(optimized) -> onnx.ModelProto:
    return optimized.load()


@pytest.fixture(scope="module")
def linear_names(optimized) -> set[str]:
    return {n for n, info in optimized.nodes.items() if info.category == "linear"}


@pytest.fixture(scope="module")
def sensitivity(optimized, model, stats, tokenizer, texts, profile):
    return measure_sensitivity(optimized, stats, profile)


@pytest.fixture(scope="module")
def run_quantize(optimized, stats, tokenizer, texts, profile, tmp_path_factory):
    """quantize() with a given sensitivity_target_mean_cosine; returns (QuantizedModel, progress lines)."""

    def _run(target: float, **others):
        p = with_quantization(profile, sensitivity_target_mean_cosine=target, **others)
        out = io.StringIO()
        q = quantize(optimized, stats, tokenizer, texts, p, "mean", tmp_path_factory.mktemp("q"), Progress(stream=out))
        return q, out.getvalue().splitlines()

    return _run


# --- measure_sensitivity --------------------------------------------------------------------------------------------


@pytest.mark.encoders
def test_one_non_negative_gain_per_linear_layer(sensitivity, linear_names):
    assert len(linear_names) == N_LINEAR
    assert set(sensitivity.gains) == linear_names
    assert all(math.isfinite(d) and d >= 0.0 for d in sensitivity.gains.values())
    assert any(d > 0.0 for d in sensitivity.gains.values())  # promotion does change something
    assert sensitivity.samples == SENS_SAMPLES  # the texts whose tokens were sampled: the profile's, not all N_CAL


@pytest.mark.encoders
def test_gain_is_the_layers_static_error_minus_its_per_token_error(optimized, model, stats, profile, sensitivity):
    """Each gain is calibration's per-layer measurement, and that measurement is the layer's own arithmetic: the
    relative squared output error of the promoted layer over sampled tokens is below static int8's for the top-ranked
    layer, and 0 gain is clamped, never negative."""
    for name, gain in sensitivity.gains.items():
        e = stats.layer_errors[name]
        assert gain == pytest.approx(max(0.0, e.static - e.per_token), abs=1e-15)
        assert 0 <= e.weight_only <= e.per_token and 0 < e.static < 1, (name, e)
    top = sensitivity.ranking()[0]
    assert stats.layer_errors[top].per_token < stats.layer_errors[top].static


# --- apply_plan -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def all_int8(optimized, model, stats, profile):
    plan = decide_precision(optimized.nodes, profile)
    return plan, apply_plan(model, plan, stats, profile)


@pytest.mark.encoders
def test_all_int8_plan_rewrites_every_linear_layer_to_qdq(all_int8, linear_names, model):
    plan, q = all_int8
    assert {d.name for d in plan.of("int8")} == linear_names
    producer = {o: n for n in q.graph.node for o in n.output}
    inits = {i.name: i for i in q.graph.initializer}
    for node in q.graph.node:
        if node.name not in linear_names:
            continue
        w_dq = producer[node.input[1]]
        assert w_dq.op_type == "DequantizeLinear", node.name
        assert numpy_helper.to_array(inits[w_dq.input[0]]).dtype == np.int8
        x_dq = producer[node.input[0]]
        assert x_dq.op_type == "DequantizeLinear", node.name
        x_q = producer[x_dq.input[0]]
        assert x_q.op_type == "QuantizeLinear", node.name
        assert numpy_helper.to_array(inits[x_q.input[2]]).dtype == np.uint8  # the profile's activation_type
    ops = [n.op_type for n in q.graph.node]
    assert ops.count("QuantizeLinear") == 8  # q/k/v share their input: 4 distinct activations per layer
    assert ops.count("DequantizeLinear") == 2 * N_LINEAR
    # the input model is left as it was
    assert not {"QuantizeLinear", "DequantizeLinear"} & {n.op_type for n in model.graph.node}
    onnx.checker.check_model(q)


@pytest.mark.encoders
def test_all_int8_model_runs_and_stays_close_to_fp32(all_int8, optimized, tokenizer):
    _, q = all_int8
    texts = load_texts(EVALUATION_FILE).head(16)
    ref = embed(session(optimized.exported.onnx_path), tokenizer, texts, SEQ_LEN, "mean")
    out = embed(session(q), tokenizer, texts, SEQ_LEN, "mean")
    assert out.shape == ref.shape == (16, 64) and np.isfinite(out).all()
    assert not np.array_equal(out, ref)  # it is really quantized
    acc = compare(ref, out)
    assert acc.min_cosine >= MIN_POOLED_COSINE, acc
    # (no retrieval check here: a random BERT's pooled embeddings all point almost the same way, so nearest
    # neighbours flip on 1e-7 changes; measured 15 of 16 agree at cosine 0.9999998)


# --- quantize -------------------------------------------------------------------------------------------------------


@pytest.mark.encoders
def test_target_one_promotes_every_linear_layer(run_quantize, linear_names):
    q, lines = run_quantize(1.0)
    assert q.promoted == N_LINEAR
    assert {d.name for d in q.plan.of("int8-per-token")} == linear_names
    assert q.plan.of("int8") == []
    # mean cosine 1.0 is never reached, so every step of the schedule was tried, the last one with all layers
    selects = [line for line in lines if "] select: " in line]
    assert [int(re.search(r"select: (\d+) of 12", s).group(1)) for s in selects] == [0, 1, 2, 3, 4, 6, 8, 10, 12]
    # the ranking is calibration's per-layer measurement: no model is scored per layer here
    assert not [line for line in lines if "sensitivity of linear layer" in line]
    assert q.calibration_accuracy.samples == N_CAL and q.calibration_accuracy.mean_cosine < 1.0


@pytest.mark.encoders
def test_target_zero_promotes_none(run_quantize, linear_names, stats, tokenizer, texts, profile):
    q, lines = run_quantize(0.0, sensitivity_target_min_cosine=0.0, sensitivity_target_retrieval_top1=0.0)
    assert q.promoted == 0
    assert {d.name for d in q.plan.of("int8")} == linear_names
    assert len([line for line in lines if "] select: " in line]) == 1  # met at the first step
    # the file written is the chosen plan's model, scored as recorded
    assert q.onnx_path.name == "quantized.onnx" and q.onnx_path.is_file()
    saved = onnx.load(str(q.onnx_path))
    assert sum(n.op_type == "QuantizeLinear" for n in saved.graph.node) == 8
    out = embed(session(saved), tokenizer, texts, SEQ_LEN, "mean")
    again = compare(stats.reference, out)
    assert again.samples == q.calibration_accuracy.samples == N_CAL
    assert again.mean_cosine == pytest.approx(q.calibration_accuracy.mean_cosine, abs=1e-9)
    assert again.min_cosine == pytest.approx(q.calibration_accuracy.min_cosine, abs=1e-9)
    assert set(q.sensitivity.gains) == linear_names


# --- selection_met --------------------------------------------------------------------------------------------------


def acc(mean=1.0, mn=1.0, top1=1.0) -> EncoderAccuracy:
    return EncoderAccuracy(mean, mn, top1, 10)


@pytest.mark.parametrize("accuracy, met", [
    (acc(), True),
    (acc(0.998, 0.99, 0.96), True),  # every target exactly met (>=)
    (acc(0.9979, 0.995, 1.0), False),  # mean cosine under its target
    (acc(0.999, 0.9899, 1.0), False),  # worst text under its target (the budget's bar is 0.98)
    (acc(0.999, 0.995, 0.959), False),  # retrieval agreement under its target (the budget's bar is 0.95)
    (acc(float("nan"), 1.0, 1.0), False),
    (acc(1.0, float("nan"), 1.0), False),
])
def test_selection_met(profile, accuracy, met):
    # the cases are written for these targets (the bundled profile's may move)
    profile = with_quantization(profile, sensitivity_target_mean_cosine=0.998, sensitivity_target_min_cosine=0.99)
    q = profile.quantization
    assert (q.sensitivity_target_mean_cosine, q.sensitivity_target_min_cosine, q.sensitivity_target_retrieval_top1) == \
        (0.998, 0.99, 0.96)
    assert selection_met(accuracy, profile) is met


def test_selection_targets_come_from_the_profile_and_never_sit_below_the_budget(profile):
    assert selection_met(acc(0.9, 0.99, 1.0), with_quantization(profile, sensitivity_target_mean_cosine=0.9)) is False
    loose = with_quantization(profile, sensitivity_target_mean_cosine=0.9, sensitivity_target_min_cosine=0.5,
                              sensitivity_target_retrieval_top1=0.5)
    assert selection_met(acc(0.995, 0.98, 0.95), loose)  # at the budget's bars
    assert unmet_targets(acc(0.9949, 0.97, 0.94), loose) == (
        "mean cosine 0.994900 < 0.995", "min cosine 0.970000 < 0.98", "retrieval top-1 0.940000 < 0.95")
    strict = dataclasses.replace(profile, accuracy=dataclasses.replace(profile.accuracy, min_min_cosine=0.995))
    assert not selection_met(acc(1.0, 0.994, 1.0), strict)
    assert [t.key for t in selection_targets(profile)] == [
        "quantization.sensitivity_target_mean_cosine", "quantization.sensitivity_target_min_cosine",
        "quantization.sensitivity_target_retrieval_top1"]


@pytest.fixture(scope="module")
def outlier_quantize(tmp_path_factory, profile):
    """quantize() on a tiny BERT with outlier channels (tests/tiny_models.py), on N_CAL calibration texts, with the
    accuracy budget's bars at 0 so that only the given targets count; returns the QuantizedModel. Measured
    (scale 30): the all-int8 plan keeps mean cosine 0.9999995 but agrees on 15 of 16 nearest neighbours."""
    from transformers import AutoTokenizer

    folder = tiny_bert_with_outliers(tmp_path_factory.mktemp("models") / "tiny-bert-outliers", scale=30.0)
    work = tmp_path_factory.mktemp("outliers-work")
    optimized = optimize(export(inspect_model_dir(folder), work), work)
    tokenizer = AutoTokenizer.from_pretrained(str(optimized.exported.tokenizer_dir), local_files_only=True)
    texts = load_texts(CALIBRATION_FILE).head(N_CAL)
    stats = calibrate(optimized, tokenizer, texts, profile.quantization, "mean")
    bars = dataclasses.replace(profile.accuracy, min_mean_cosine=0.0, min_min_cosine=0.0, min_retrieval_top1=0.0)

    def _run(mean: float, min_: float, top1: float):
        # weight-only promotions: float activations make every target reachable by promoting all layers
        p = with_quantization(dataclasses.replace(profile, accuracy=bars), sensitivity_target_mean_cosine=mean,
                              sensitivity_target_min_cosine=min_, sensitivity_target_retrieval_top1=top1,
                              sensitive_precision="int8-weight-only")
        return quantize(optimized, stats, tokenizer, texts, p, "mean", tmp_path_factory.mktemp("q"))

    return _run


@pytest.mark.encoders
def test_search_promotes_until_retrieval_and_min_cosine_are_met_not_only_mean_cosine(outlier_quantize):
    """Issue 17: the search stopped on mean cosine while the gate failed on retrieval top-1 held back. Here the
    all-int8 plan meets the mean-cosine target, and the search still promotes until the retrieval target (then,
    separately, a min-cosine target) is met: exactly to the first count that meets it."""
    table = outlier_quantize(1.0, 1.0, 1.0).selection  # unreachable targets: every count, in order
    assert [s.promoted for s in table] == promotion_steps(N_LINEAR)
    first = table[0].accuracy
    assert first.mean_cosine >= 0.99999 and first.retrieval_top1 < 1.0  # mean cosine alone would stop here

    q = outlier_quantize(0.99999, 0.0, 1.0)
    want = next(s.promoted for s in table if s.accuracy.retrieval_top1 >= 1.0)
    assert want > 0 and q.promoted == want and q.targets_met
    assert all(len(s.unmet) == 1 and s.unmet[0].startswith("retrieval top-1 ") for s in q.selection[:-1])
    assert [s.accuracy for s in q.selection] == [s.accuracy for s in table[: len(q.selection)]]  # measured alike
    assert len(q.plan.of("int8-weight-only")) == want

    best = max(s.accuracy.min_cosine for s in table)
    target = (first.min_cosine + best) / 2
    q = outlier_quantize(0.99999, target, 0.0)
    want = next(s.promoted for s in table if s.accuracy.min_cosine >= target)
    assert want > 0 and q.promoted == want and q.targets_met
    assert all(len(s.unmet) == 1 and s.unmet[0].startswith("min cosine ") for s in q.selection[:-1])
