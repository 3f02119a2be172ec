"""record: the manifest sections every recipe writes the same way (provenance, text files, precision, budget,
size, model inputs and outputs), from explicit artifacts."""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort

from edgeq.metrics import EncoderAccuracy
from edgeq.policy import PrecisionPlan, SelectionStep
from edgeq.profiles import Profile
from edgeq.request import ExportRequest, Inputs
from edgeq.textdata import TextSet

# Below this FP32 size the ORT format's fixed tables (node and kernel records, ~0.1-0.2 MB) outweigh the weights and
# the ratio says nothing about quantization: a 2-layer test BERT of 0.6 MB packs to 0.3 MB whatever its precision.
SIZE_CHECK_MIN_BYTES = 8_000_000


def provenance(inputs: Inputs, req: ExportRequest) -> dict:
    """What the package was made from: source files' hashes and the profile as applied.

    Only what identical runs share: no creation time and no local paths (the source by its name and file hashes,
    the profile and text files by name and sha256), so the same inputs give a byte-identical manifest and
    ``edgeq verify --rebuild`` can compare one."""
    src, profile = inputs.source, inputs.profile
    profile_file = Path(profile.source).name
    return {
        "source": {"name": src.name, "model_type": src.model_type, "architecture": src.architecture,
                   "task": src.task, "kind": src.kind, "pooling": src.pooling, "gguf_file": src.gguf_file,
                   "allow_pickle": req.allow_pickle, "weight_format": src.weight_format,
                   "weight_files": list(src.weight_files), "files": src.file_hashes},
        "profile": {"name": profile.name, "file": profile_file, "sha256": profile.sha256,
                    # --name only when given: a package under its default name keeps the bytes it had before
                    "overrides": {"calibration_samples": req.samples, "calibration_seq_len": req.seq_len,
                                  **({"package_name": req.name} if req.name else {}), **dict(req.settings)},
                    # values after the command line's overrides
                    "values": {**profile.to_dict(), "source": profile_file}},
    }


def text_file_record(texts: TextSet) -> dict:
    """A calibration or evaluation file as the manifest names it: file name and sha256, not where it was."""
    return {"file": texts.path.name, "sha256": texts.sha256}


def precision_section(plan: PrecisionPlan, promoted: int, selection: EncoderAccuracy, measure: str = "sensitivity",
                      digits: int = 7, steps: tuple[SelectionStep, ...] = (), size_note: str = "") -> dict:
    """The manifest's per-node precision record; ``measure`` names what NodeDecision.sensitivity holds;
    ``steps``: the promotion counts the search tried on calibration text, and what each left unmet; ``size_note``:
    why fewer were promoted than the targets chose."""
    return {
        "summary": plan.summary(),
        "promoted_sensitive_layers": promoted,
        "selection_accuracy_on_calibration_text": selection.to_dict(),
        **({"selection_steps": [s.to_dict() for s in steps]} if steps else {}),
        **({"selection_size_note": size_note} if size_note else {}),
        "nodes": [{"name": d.name, "op": d.op_type, "category": d.category, "role": d.role,
                   "precision": d.precision, "reason": d.reason,
                   **({measure: round(d.sensitivity, digits)} if d.sensitivity is not None else {})}
                  for d in plan.decisions],
    }


def budget_section(profile: Profile) -> dict:
    b = profile.accuracy
    return {"min_mean_cosine": b.min_mean_cosine, "min_min_cosine": b.min_min_cosine,
            "min_retrieval_top1": b.min_retrieval_top1}


def size_report(model_path: Path, fp32_path: Path, profile: Profile) -> dict:
    model = model_path.stat().st_size
    fp32 = sum(p.stat().st_size for p in fp32_path.parent.glob(fp32_path.name + "*"))  # with external data
    return {"model_bytes": model, "fp32_onnx_bytes": fp32, "ratio": round(model / fp32, 4),
            "max_ratio": profile.package.max_size_ratio, "checked": fp32 >= SIZE_CHECK_MIN_BYTES}


def over_size_ratio(size: dict) -> bool:
    """``size`` is a size section (``size_report``); compared in bytes, not the rounded ratio the manifest shows
    (36,212,345 B of 90,510,000 B is over 40% though it rounds to 40.0%)."""
    return size["checked"] and size["model_bytes"] > size["max_ratio"] * size["fp32_onnx_bytes"]


def model_io(sess: ort.InferenceSession) -> dict:
    """The ``inputs``, ``outputs`` and ``ort_version`` entries of the manifest's model section."""
    return {
        "inputs": [{"name": i.name, "dtype": i.type, "shape": i.shape} for i in sess.get_inputs()],
        "outputs": [{"name": o.name, "dtype": o.type, "shape": o.shape} for o in sess.get_outputs()],
        "ort_version": ort.__version__,
    }
