"""What ``edgeq profiles`` prints: each profile in a few lines within LINE columns (name and target, then how it
quantizes each model kind, then its note), and with ``--fields`` every profile key with its default and doc."""

from __future__ import annotations

import textwrap

from edgeq.profiles import QNN_EP, Profile, describe_fields

LINE = 100  # columns, as `edgeq families` and `edgeq targets`
NAME_WIDTH = 18  # the longest bundled name, android-qnn-htp, and two spaces


def _wrapped(text: str, first: str, rest: str) -> list[str]:
    return textwrap.wrap(text, LINE, initial_indent=first, subsequent_indent=rest, break_on_hyphens=False)


def quantization_lines(p: Profile) -> list[str]:
    """How ``p`` quantizes each model kind it takes, one sentence per kind."""
    q, h = p.quantization, p.qnn
    if p.execution_provider == QNN_EP:
        return [f"encoders: QDQ {h.activation_bits}-bit activations, {h.weight_bits}-bit per-tensor weights "
                f"({h.sensitive_weight_bits}-bit where needed); static {h.batch_size}x{h.seq_len}; EPContext for "
                f"soc_model {h.soc_model} (v{h.htp_arch})"]
    how = []
    if "encoder" in p.model_kinds:
        how.append(f"encoders: linear {q.weight_type} per-{'channel' if q.weight_per_channel else 'tensor'} "
                   f"weights, {q.activation_type} activations ({q.calibration_method}); sensitive layers "
                   f"{q.sensitive_precision}; FP16: {', '.join(q.keep_fp16) or 'none'}")
    if "causal-lm" in p.model_kinds:
        m = p.llm
        how.append(f"causal LMs: INT4 {m.int4_method} block {m.block_size} "
                   f"{'symmetric' if m.symmetric else 'asymmetric'}{', K/V INT8' if m.int8_kv else ''}; "
                   f"lm_head {m.lm_head_precision}; embeddings {m.embedding_precision}; GenAI folder")
    return how


def profile_lines(p: Profile) -> list[str]:
    """``name  target``, then the kinds it takes, how it quantizes them and its note, indented beneath."""
    lines = _wrapped(p.target, f"{p.name:<{NAME_WIDTH - 2}}  ", " " * NAME_WIDTH)
    lines += _wrapped(f"models: {', '.join(p.model_kinds)}", "    ", "      ")
    for text in quantization_lines(p):
        lines += _wrapped(text, "    ", "      ")
    if p.status != "supported" or p.note:
        lines += _wrapped(f"{p.status.upper()}: {p.note}" if p.status != "supported" else p.note, "    ", "      ")
    return lines


def field_lines() -> list[str]:
    """Every profile key (``section.key (default X)``) with its doc wrapped beneath."""
    lines = []
    for key, default, doc in describe_fields():
        lines.append(f"{key}{f' (default {default})' if default else ''}")
        lines += _wrapped(doc, "    ", "    ")
    return lines
