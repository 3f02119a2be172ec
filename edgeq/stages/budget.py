"""budget: a package's measured accuracy and size against the profile's bars.

Each check returns the error to raise (or None) rather than raising it: a recipe hands its verdicts to the
pipeline, which raises the first after the manifest is written and before anything is placed."""

from __future__ import annotations

from edgeq.errors import AccuracyBudgetError, SizeBudgetError
from edgeq.llm.evaluate import LMAccuracy
from edgeq.metrics import EncoderAccuracy
from edgeq.profiles import AccuracyBudget, LLMSpec, Profile
from edgeq.stages.quantize import QuantizedModel

Row = tuple[str, float, float]  # (what, measured, the least it may be)


def encoder_rows(acc: EncoderAccuracy, bars: AccuracyBudget) -> list[Row]:
    return [("mean cosine", acc.mean_cosine, bars.min_mean_cosine), ("min cosine", acc.min_cosine, bars.min_min_cosine),
            ("retrieval top-1 agreement", acc.retrieval_top1, bars.min_retrieval_top1)]


def failures(rows: list[Row]) -> list[str]:
    return [f"{name} {got:.4f} < {need}" for name, got, need in rows if not got >= need]  # NaN fails too


def encoder_accuracy_error(profile: Profile, acc: EncoderAccuracy, quantized: QuantizedModel) -> AccuracyBudgetError | None:
    failed = failures(encoder_rows(acc, profile.accuracy))
    if not failed:
        return None
    worst = quantized.sensitivity.ranking()[:5]
    named = ", ".join(f"{n} ({quantized.sensitivity.drops[n]:.2e})" for n in worst)
    return AccuracyBudgetError(
        f"accuracy over budget on {acc.samples} held-back texts: {'; '.join(failed)}. "
        f"Most sensitive layers (mean-cosine drop alone at int8): {named}",
        "raise quantization.sensitivity_target_mean_cosine in the profile, list layers in keep_fp32_nodes, or "
        "calibrate on text closer to your use (--calibration)",
    )


def over_size_ratio(size: dict) -> bool:
    """``size`` is a manifest size section (``stages.record.size_report``)."""
    return size["checked"] and size["ratio"] > size["max_ratio"]


def encoder_size_error(size: dict, quantized: QuantizedModel) -> SizeBudgetError | None:
    if not over_size_ratio(size):
        return None
    return SizeBudgetError(
        f"model is {size['model_bytes'] / 1e6:.1f} MB, {size['ratio']:.1%} of the FP32 export "
        f"({size['fp32_onnx_bytes'] / 1e6:.1f} MB); the profile allows {size['max_ratio']:.0%} "
        f"({quantized.promoted} layers were promoted to the sensitive precision)",
        "raise package.max_size_ratio in the profile, or lower quantization.sensitivity_target_mean_cosine",
    )


def qnn_accuracy_error(profile: Profile, acc: EncoderAccuracy, htp: dict, promoted: int) -> AccuracyBudgetError | None:
    """``htp``: the manifest's qnn.simulator.runs (per model file: placement and accuracy on the HTP simulator)."""
    b = profile.accuracy
    rows = encoder_rows(acc, b)
    for name, run in htp.items():
        rows.append((f"mean cosine on the HTP simulator ({name})", run["accuracy_vs_fp32"]["mean_cosine"], b.min_mean_cosine))
        rows.append((f"HTP node share ({name})", run["placement"]["htp_fraction"], 1.0))
    failed = failures(rows)
    if not failed:
        return None
    return AccuracyBudgetError(
        f"over budget ({acc.samples} held-back texts on the CPU EP): {'; '.join(failed)}; "
        f"{promoted} linear layers had {profile.qnn.sensitive_weight_bits}-bit weights",
        "raise qnn.sensitivity_target_mean_cosine or qnn.seq_len in the profile, or calibrate on text closer to "
        "your use (--calibration)")


def qnn_size_error(size: dict) -> SizeBudgetError | None:
    if not over_size_ratio(size):
        return None
    return SizeBudgetError(f"model.onnx is {size['ratio']:.1%} of the FP32 export; the profile allows {size['max_ratio']:.0%}",
                           "raise package.max_size_ratio, or lower qnn.sensitivity_target_mean_cosine")


def lm_accuracy_error(acc: LMAccuracy, spec: LLMSpec) -> AccuracyBudgetError | None:
    failed = []
    if not acc.ppl_increase <= spec.max_ppl_increase:
        failed.append(f"perplexity {acc.perplexity:.2f} vs FP32 {acc.ref_perplexity:.2f} "
                      f"(+{acc.ppl_increase:.1%} > +{spec.max_ppl_increase:.0%})")
    if not acc.top1_agreement >= spec.min_top1_agreement:
        failed.append(f"top-1 agreement {acc.top1_agreement:.3f} < {spec.min_top1_agreement}")
    if not failed:
        return None
    return AccuracyBudgetError(f"accuracy over budget on {acc.tokens} held-back tokens: {'; '.join(failed)}",
                               "try " + ", ".join(_more_accurate(spec)) + " (--set KEY=VALUE)")


def lm_size_error(size: int, bits_per_weight: float, spec: LLMSpec) -> SizeBudgetError | None:
    """The linear layers' average stored bits per weight against ``max_bits_per_weight`` (relative: every model
    has a sensible default) and, when the profile sets one, the whole model against ``max_size_mb``."""
    over = []
    if not bits_per_weight <= spec.max_bits_per_weight:
        over.append(f"the linear layers store {bits_per_weight:.4f} bits per weight, over the profile's "
                    f"{spec.max_bits_per_weight:g}")
    if spec.max_size_mb and not size <= spec.max_size_mb * 1e6:
        over.append(f"the model is {size} bytes ({size / 1e6:.3f} MB), over the profile's {spec.max_size_mb:g} MB")
    if not over:
        return None
    return SizeBudgetError("; ".join(over),
                           "use --set llm.promote=0 (no 8-bit promotions), or raise --set llm.max_bits_per_weight=... "
                           "/ --max-size-mb, or --set llm.block_size=64")


def _more_accurate(spec: LLMSpec) -> list[str]:
    """Settings that cost size or time for accuracy, from the ones this export did not use."""
    tips = []
    if spec.int4_method != "gptq":
        tips.append("llm.int4_method=gptq")
    if spec.symmetric:
        tips.append("llm.symmetric=false")
    if spec.block_size > 16:
        tips.append(f"llm.block_size={spec.block_size // 2}")
    if not spec.int8_kv:
        tips.append("llm.int8_kv=true")
    tips.append(f"llm.promote={max(spec.promote / 2, 1.0) if spec.promote else 2.0:g} with a larger llm.max_size_mb")
    return tips
