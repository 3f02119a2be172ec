"""budget: a package's measured accuracy and size against the profile's bars.

Each check returns the error to raise (or None) rather than raising it: a recipe hands its verdicts to the
pipeline, which raises the first after the manifest is written and before anything is placed."""

from __future__ import annotations

import math

from edgeq.errors import AccuracyBudgetError, SizeBudgetError
from edgeq.llm.evaluate import LMAccuracy
from edgeq.metrics import EncoderAccuracy, shown
from edgeq.policy import selection_targets
from edgeq.policy.encoder import unmet_targets
from edgeq.profiles import AccuracyBudget, LLMSpec, Profile
from edgeq.stages.quantize import QuantizedModel
from edgeq.stages.record import over_size_ratio
from edgeq.stages.remedy import Fix, Measured, Search, size_limit_setting

Row = tuple[str, float, float]  # (what, measured, the least it may be)


def encoder_rows(acc: EncoderAccuracy, bars: AccuracyBudget) -> list[Row]:
    return [("mean cosine", acc.mean_cosine, bars.min_mean_cosine), ("min cosine", acc.min_cosine, bars.min_min_cosine),
            ("retrieval top-1 agreement", acc.retrieval_top1, bars.min_retrieval_top1)]


def failures(rows: list[Row]) -> list[str]:
    return [f"{name} {shown(got, need)} < {need}" for name, got, need in rows if not got >= need]  # NaN fails too


def gated_metrics(acc: EncoderAccuracy, bars: AccuracyBudget) -> str:
    """Every gated metric with its bar, unrounded enough to show why it passed or failed (top-1 as a count)."""
    top1 = (f"{shown(acc.retrieval_top1, bars.min_retrieval_top1)} = {round(acc.retrieval_top1 * acc.samples)} of "
            f"{acc.samples}")
    return (f"mean cosine {shown(acc.mean_cosine, bars.min_mean_cosine)} (bar {bars.min_mean_cosine}), min cosine "
            f"{shown(acc.min_cosine, bars.min_min_cosine)} (bar {bars.min_min_cosine}), retrieval top-1 agreement "
            f"{top1} (bar {bars.min_retrieval_top1})")


def size_text(size: dict, name: str = "model") -> str:
    """The numbers a size check compares, unrounded: bytes, the exact ratio, and the limit in bytes."""
    model, fp32 = size["model_bytes"], size["fp32_onnx_bytes"]
    limit = (f"package.max_size_ratio = {size['max_ratio']:g}: at most {math.floor(size['max_ratio'] * fp32):,} B"
             if size["checked"] else "not checked: the FP32 export is under 8 MB")
    return f"{name} {model:,} B = {100 * model / fp32:.4f}% of the FP32 export's {fp32:,} B ({limit})"


def measured(promoted: int, acc: EncoderAccuracy, size: dict, profile: Profile) -> Measured:
    """A built encoder package's verdict: what fails the accuracy budget, and whether it is over the size budget."""
    return Measured(promoted, acc, size, tuple(failures(encoder_rows(acc, profile.accuracy))), over_size_ratio(size))


def _selection(quantized: QuantizedModel, profile: Profile) -> str:
    last = quantized.selection[-1]
    n, precision = len(quantized.sensitivity.gains), profile.quantization.sensitive_precision
    if quantized.size_note:
        unmet = unmet_targets(quantized.calibration_accuracy, profile)
        return (f"Size budget: {quantized.size_note} ({quantized.promoted} of {n} linear layers at {precision}; on "
                f"calibration text {', '.join(unmet) or 'every target is met'})")
    if not last.unmet:
        met = ", ".join(f"{t.label} {shown(getattr(last.accuracy, t.metric), t.target)} >= {t.target}"
                        for t in selection_targets(profile))
        return (f"The search promoted {last.promoted} of {n} linear layers to {precision}, the first count whose "
                f"calibration-text accuracy met every target ({met})")
    return (f"No promotion count met every target on calibration text; with all {n} linear layers at {precision}: "
            f"{', '.join(last.unmet)}")


def _fix_hint(fix: Fix | None, base: Measured, bars: AccuracyBudget) -> str:
    if fix is None:
        return ("no promotion count passes the gate, all layers promoted included: calibrate on text closer to your "
                "use (--calibration FILE), or keep the promoted layers in float with "
                "--set quantization.sensitive_precision=fp32 (larger)")
    m = fix.measured
    sets = " ".join(f"--set {s}" for s in fix.settings)
    what = "passes" if len(fix.settings) == 1 else "pass together (no single setting does)"
    if m is base:
        done = f"this package is within the accuracy budget ({gated_metrics(m.accuracy, bars)})"
    else:
        done = (f"measured, the export then promotes {m.promoted} layers: held-back {gated_metrics(m.accuracy, bars)}; "
                f"{size_text(m.size)}, {m.size['model_bytes'] - base.size['model_bytes']:+,} B")
    return f"{sets} {what}: {done}"


def encoder_accuracy_error(profile: Profile, base: Measured, quantized: QuantizedModel,
                           fix: Fix | None) -> AccuracyBudgetError | None:
    """All gated metrics and the size, how the search chose the plan, and the measured closest fix."""
    acc, failed = base.accuracy, base.accuracy_failures
    if not failed:
        return None
    worst = quantized.sensitivity.ranking()[:5]
    named = ", ".join(f"{n} ({quantized.sensitivity.gains[n]:.2e})" for n in worst)
    return AccuracyBudgetError(
        f"accuracy over budget on {acc.samples} held-back texts: {'; '.join(failed)}. All gated metrics: "
        f"{gated_metrics(acc, profile.accuracy)}; {size_text(base.size)}. {_selection(quantized, profile)}. "
        f"Most sensitive layers (output error a promotion cuts): {named}",
        _fix_hint(fix, base, profile.accuracy))


def encoder_size_error(profile: Profile, base: Measured, quantized: QuantizedModel,
                       fix: Fix | None) -> SizeBudgetError | None:
    if not base.over_size:
        return None
    return SizeBudgetError(f"{size_text(base.size)}: over the size budget. {_selection(quantized, profile)}",
                           _fix_hint(fix, base, profile.accuracy))


def qnn_accuracy_error(profile: Profile, acc: EncoderAccuracy, htp: dict, promoted: int,
                       size: dict) -> AccuracyBudgetError | None:
    """``htp``: the manifest's qnn.simulator.runs (per model file: placement and accuracy on the HTP simulator)."""
    b, spec = profile.accuracy, profile.qnn
    rows = encoder_rows(acc, b)
    for name, run in htp.items():
        rows.append((f"mean cosine on the HTP simulator ({name})", run["accuracy_vs_fp32"]["mean_cosine"], b.min_mean_cosine))
        rows.append((f"HTP node share ({name})", run["placement"]["htp_fraction"], 1.0))
    failed = failures(rows)
    if not failed:
        return None
    target = raised_target(spec.sensitivity_target_mean_cosine)
    longer = f" or --set qnn.seq_len={min(2 * spec.seq_len, 512)} (texts cut at {spec.seq_len} tokens)" \
        if spec.seq_len < 512 else ""
    return AccuracyBudgetError(
        f"over budget ({acc.samples} held-back texts on the CPU EP): {'; '.join(failed)}. All gated metrics: "
        f"{gated_metrics(acc, b)}; {size_text(size, 'model.onnx')}; {promoted} linear layers had "
        f"{spec.sensitive_weight_bits}-bit weights",
        f"--set qnn.sensitivity_target_mean_cosine={target} (more {spec.sensitive_weight_bits}-bit layers, larger)"
        f"{longer}, or calibrate on text closer to your use (--calibration FILE)")


def raised_target(target: float) -> str:
    """A cosine target halfway from ``target`` to 1 (0.998 -> 0.999): one step stricter, printed as typed."""
    return f"{1 - (1 - target) / 2:.6g}"


def qnn_size_error(size: dict) -> SizeBudgetError | None:
    if not over_size_ratio(size):
        return None
    return SizeBudgetError(f"{size_text(size, 'model.onnx')}: over the size budget",
                           f"--set {size_limit_setting(size)} admits this model; or fewer 16-bit layers with a lower "
                           "--set qnn.sensitivity_target_mean_cosine=...")


def lm_measured(promoted: int, acc: LMAccuracy, size: dict, spec: LLMSpec) -> Measured:
    """A built causal-LM package's verdict; ``size``: its manifest size section (model_bytes, bits_per_weight)."""
    return Measured(promoted, acc, size, tuple(lm_failures(acc, spec)),
                    lm_size_error(size["model_bytes"], size["bits_per_weight"], spec) is not None)


def lm_failures(acc: LMAccuracy, spec: LLMSpec) -> list[str]:
    failed = []
    if not acc.ppl_increase <= spec.max_ppl_increase:
        failed.append(f"perplexity increase {acc.ppl_increase:+.4%} > +{spec.max_ppl_increase:.4%}")
    if not acc.top1_agreement >= spec.min_top1_agreement:
        failed.append(f"top-1 agreement {acc.top1_agreement:.6f} < {spec.min_top1_agreement}")
    return failed


def lm_metrics(acc: LMAccuracy, spec: LLMSpec) -> str:
    """Every gated metric with its bar, and the KL beside them."""
    return (f"perplexity {acc.perplexity:.4f} vs FP32 {acc.ref_perplexity:.4f} ({acc.ppl_increase:+.4%}, bar "
            f"+{spec.max_ppl_increase:.4%}), top-1 agreement {acc.top1_agreement:.6f} (bar {spec.min_top1_agreement}), "
            f"mean KL {acc.mean_kl:.6f}")


def lm_size_text(size: dict, spec: LLMSpec, since: dict | None = None) -> str:
    """The model's bytes (and the difference from ``since``'s) and its linear layers' bits per weight, with the bars."""
    delta = f" ({size['model_bytes'] - since['model_bytes']:+,} B)" if since else ""
    cap = f", and at most {round(spec.max_size_mb * 1e6):,} B" if spec.max_size_mb else ""
    return (f"the model is {size['model_bytes']:,} B{delta}, its linear layers {size['bits_per_weight']:.4f} bits per "
            f"weight (bar {spec.max_bits_per_weight:g}{cap})")


def lm_accuracy_error(base: Measured, spec: LLMSpec, search: Search) -> AccuracyBudgetError | None:
    """All gated metrics and the size of the package built, and the closest fix the search measured."""
    if not base.accuracy_failures:
        return None
    acc = base.accuracy
    return AccuracyBudgetError(
        f"accuracy over budget on {acc.tokens} held-back tokens: {'; '.join(base.accuracy_failures)}. All gated "
        f"metrics: {lm_metrics(acc, spec)}; {lm_size_text(base.size, spec)}, {base.promoted} linear "
        "layers at 8 bits",
        _lm_fix_hint(base, spec, search))


def _lm_fix_hint(base: Measured, spec: LLMSpec, search: Search) -> str:
    def result(t: Fix) -> str:
        m = t.measured
        return (f"{m.accuracy.ppl_increase:+.4%} perplexity, top-1 {m.accuracy.top1_agreement:.6f}, "
                f"{m.size['model_bytes']:,} B{' (over the size budget)' if m.over_size else ''}")

    fix = search.fix
    before = [t for t in search.tried if t is not fix]
    tried = "; ".join(f"--set {t.settings[0]}: {result(t)}" for t in before)
    if fix is not None:
        m = fix.measured
        return (f"--set {fix.settings[0]} passes: measured, the export then has {m.promoted} linear layers at 8 bits: "
                f"held-back {lm_metrics(m.accuracy, spec)}; {lm_size_text(m.size, spec, base.size)}"
                + (f" (tried first, failing: {tried})" if tried else ""))
    beyond = ("calibrate on text closer to your use (--calibration FILE), or allow more bytes: --set "
              f"llm.max_bits_per_weight=... (now {spec.max_bits_per_weight:g}) admits more 8-bit layers")
    if not search.tried:
        return f"no single setting within the size budget changes this package: {beyond}"
    best = min(search.tried, key=lambda t: _shortfall(t.measured, spec))
    failing = best.measured.accuracy_failures or ("over the size budget",)
    untried = f"; not tried (larger): {', '.join(f'--set {u}' for u in search.untried)}" if search.untried else ""
    return (f"none of the {len(search.tried)} settings tried within the size budget passes (each built and measured "
            f"on the held-back windows: {tried}); the closest, --set {best.settings[0]}, still has "
            f"{'; '.join(failing)}{untried}. Beyond them: {beyond}")


def _shortfall(m: Measured, spec: LLMSpec) -> tuple[bool, float]:
    """How far a package is from passing: perplexity over its bar (as a ratio) plus top-1 agreement under its bar,
    after passing the size budget."""
    acc = m.accuracy
    return m.over_size, (max(0.0, (1 + acc.ppl_increase) / (1 + spec.max_ppl_increase) - 1)
                         + max(0.0, spec.min_top1_agreement - acc.top1_agreement))


def lm_size_error(size: int, bits_per_weight: float, spec: LLMSpec) -> SizeBudgetError | None:
    """The linear layers' average stored bits per weight against ``max_bits_per_weight`` (relative: every model
    has a sensible default) and, when the profile sets one, the whole model against ``max_size_mb``."""
    over = []
    if not bits_per_weight <= spec.max_bits_per_weight:
        over.append(f"the linear layers store {bits_per_weight:.6f} bits per weight, over the profile's "
                    f"{spec.max_bits_per_weight:g} (llm.max_bits_per_weight)")
    if spec.max_size_mb and not size <= spec.max_size_mb * 1e6:
        over.append(f"the model is {size:,} B ({size / 1e6:.6f} MB), over the profile's {spec.max_size_mb:g} MB "
                    f"({round(spec.max_size_mb * 1e6):,} B, llm.max_size_mb)")
    if not over:
        return None
    need_bits = math.ceil(bits_per_weight * 100) / 100
    need_mb = math.ceil(size / 1e4) / 100
    return SizeBudgetError("; ".join(over),
                           f"use --set llm.promote=0 (no 8-bit promotions), or --set llm.max_bits_per_weight="
                           f"{max(need_bits, spec.max_bits_per_weight):g}"
                           + (f" --max-size-mb {need_mb:g}" if spec.max_size_mb else "")
                           + " (admits this model), or --set llm.block_size=64")
