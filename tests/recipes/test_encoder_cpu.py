"""edgeq.recipes.encoder_cpu: a package that fails its gate is reported with every gated metric and the size, and
with the closest single --set that passes, measured; exporting again with that setting passes with those numbers."""

from __future__ import annotations

import re

import pytest

from edgeq.errors import AccuracyBudgetError, SizeBudgetError
from edgeq.metrics import shown
from edgeq.pipeline import ExportRequest, export_package
from edgeq.profiles import parse_setting
from tiny_models import tiny_bert_with_outliers

HINT = re.compile(r"--set (?P<setting>\S+) passes: measured, the export then promotes (?P<promoted>\d+) layers: held-back "
                  r"mean cosine (?P<mean>\S+) \(bar [\d.]+\), min cosine (?P<min>\S+) \(bar [\d.]+\), retrieval top-1 "
                  r"agreement (?P<top1>\S+) = \d+ of 320 \(bar 0\.96\); model (?P<bytes>[\d,]+) B = ")

# the fixture was measured with weight-only promotions computed in float (the profiles before per-token layers) and
# unsmoothed static layers (the profiles before smoothing)
WEIGHT_ONLY = (("quantization.sensitive_precision", "int8-weight-only"), ("package.matmulnbits_accuracy_level", 0),
               ("quantization.smoothing", False))


@pytest.fixture(scope="module")
def outliers(tmp_path_factory):
    return tiny_bert_with_outliers(tmp_path_factory.mktemp("models") / "tiny-bert-outliers", scale=300.0)


@pytest.mark.encoders
def test_a_failed_gate_names_one_setting_that_then_passes(outliers, tmp_path_factory):
    """A tiny BERT with outlier channels (x300) and a user's stricter retrieval budget (0.96). Measured: one
    promoted layer makes the 16 calibration texts agree on every nearest neighbour, so the search stops there, but
    the 320 held-back texts agree on 305 (0.953): the gate fails, and the hint names the target that makes the
    search go on to a count that passes."""
    model, out = outliers, tmp_path_factory.mktemp("out")
    strict = (("accuracy.min_retrieval_top1", 0.96), *WEIGHT_ONLY)
    with pytest.raises(AccuracyBudgetError) as err:
        export_package(ExportRequest(model, "android-arm64", out_dir=out, samples=16, settings=strict))
    msg, hint = err.value.message, err.value.hint
    assert re.search(r"retrieval top-1 agreement 0\.9\d+ < 0\.96\. All gated metrics: mean cosine 0\.\d+ \(bar 0\.995\), "
                     r"min cosine 0\.\d+ \(bar 0\.98\), retrieval top-1 agreement 0\.9\d+ = \d+ of 320 \(bar 0\.96\); "
                     r"model [\d,]+ B = \d+\.\d{4}% of the FP32 export's [\d,]+ B", msg), msg
    assert re.search(r"The search promoted 1 of 12 linear layers to int8-weight-only, the first count whose "
                     r"calibration-text accuracy met every target \(.*retrieval top-1 1\.000000 >= 0\.96\)", msg), msg
    found = HINT.match(hint)
    assert found, hint
    key, value = parse_setting(found["setting"])
    assert key.startswith("quantization.sensitivity_target_") and int(found["promoted"]) > 1

    pkg = export_package(ExportRequest(model, "android-arm64", out_dir=out, samples=16, settings=(*strict, (key, value))))
    m = pkg.manifest
    assert m["precision"]["promoted_sensitive_layers"] == int(found["promoted"])
    acc, bars = m["accuracy"], m["accuracy"]["budget"]
    # the numbers the hint promised, as it printed them
    assert shown(acc["mean_cosine"], bars["min_mean_cosine"]) == found["mean"]
    assert shown(acc["min_cosine"], bars["min_min_cosine"]) == found["min"]
    assert shown(acc["retrieval_top1"], 0.96) == found["top1"]
    assert f"{m['size']['model_bytes']:,}" == found["bytes"]
    assert m["profile"]["overrides"][key] == value


@pytest.mark.encoders
def test_over_the_size_budget_the_hint_is_the_limit_that_admits_the_package(outliers, tmp_path, monkeypatch):
    """The size check switched on for the tiny model, whose ORT tables make it ~41% of FP32 whatever is promoted
    (so no count fits 38%, and a budget that cuts the search short is tested on made-up sizes in
    tests/stages/test_remedy.py): the size error says nothing fits, prints the bytes compared, and the limit it
    names admits the package."""
    monkeypatch.setattr("edgeq.stages.record.SIZE_CHECK_MIN_BYTES", 0)
    out = tmp_path / "out"
    tight = (*WEIGHT_ONLY, ("package.max_size_ratio", 0.38))
    with pytest.raises(SizeBudgetError) as err:
        export_package(ExportRequest(outliers, "android-arm64", out_dir=out, samples=16, settings=tight))
    msg, hint = err.value.message, err.value.hint
    found = re.match(r"model ([\d,]+) B = \d+\.\d{4}% of the FP32 export's [\d,]+ B \(package.max_size_ratio = 0\.38: "
                     r"at most [\d,]+ B\): over the size budget\. Size budget: no promotion count fits the size budget "
                     r"\(1 of 12 linear layers at int8-weight-only; on calibration text every target is met\)", msg)
    assert found, msg
    setting = re.match(r"--set (package\.max_size_ratio=0\.\d{4}) passes: this package is within the accuracy budget "
                       r"\(mean cosine", hint)
    assert setting, hint
    key, value = parse_setting(setting[1])
    pkg = export_package(ExportRequest(outliers, "android-arm64", out_dir=out, samples=16,
                                       settings=(*tight, (key, value))))
    assert f"{pkg.manifest['size']['model_bytes']:,}" == found[1]
    precision = pkg.manifest["precision"]
    assert precision["promoted_sensitive_layers"] == 1 and "selection_size_note" not in precision  # it fits now
