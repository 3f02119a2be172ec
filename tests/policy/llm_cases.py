"""The tiny causal LM and INT4 rule sets that tests/policy/test_causal_lm.py plans, and the script that writes its
stored expectations (expected_llm_plans.json) from the decoder path:

    HF_HUB_OFFLINE=1 PYTHONPATH=. python -m tests.policy.llm_cases

A plan that moves on purpose is written again with it, and the commit says why. The checkpoint is the one the
removed whole-graph path's plans were stored for (same config, torch seed and calibration windows; budget of the
tight case aside, which counts the decoder's own bytes): when the decoder path replaced that path, its INT4 plans
equalled the stored ones in all seven cases, layer for layer (bits; sensitivities within 1.7e-8 relative; reasons
word for word but the kept tied head's, which names the table, not the old graph's Gather and Transpose).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from edgeq.decoder.graph import embed, embedding_table, final_norm_weight, write_decoder
from edgeq.decoder.layerwise import EMBEDDING, Measured, QuantSettings, measure, quantized_head, quantized_layers
from edgeq.decoder.spec import DecoderSpec, decoder_spec
from edgeq.decoder.weights import TensorSource, open_safetensors
from edgeq.policy import Int4Decision, Int4Facts, Int4Rules, PrecisionPlan, decide_decoder_precision, decide_int4
from edgeq.profiles import Profile, load_profile

VOCAB = 256
SEQ = 48
CONTEXT = 128
SETTING = "gptq+clip, block 32, asymmetric, accuracy_level 4"
EXPECTED_FILE = Path(__file__).parent / "expected_llm_plans.json"
TABLES = frozenset({EMBEDDING})
SETTINGS = QuantSettings()  # the profile's defaults: GPTQ + clip, block 32, asymmetric, accuracy_level 4

# case -> the rules as a profile gives them (max_model_bytes "tight": the least budget that takes the first one),
# and the profile's lm_head_precision the node plan is decided under
CASES = {
    "default": (dict(int8_kv=True, promote=2.0, max_model_bytes=150_000_000), "fp16"),
    "promote-1x-no-kv": (dict(int8_kv=False, promote=1.0, max_model_bytes=150_000_000), "fp16"),
    "no-promotion": (dict(int8_kv=True, promote=None, max_model_bytes=150_000_000), "fp16"),
    "tight-budget": (dict(int8_kv=True, promote=1.0, max_model_bytes="tight"), "fp16"),
    "head-int8": (dict(quantize_tied=True, tied_bits=8, int8_kv=True, promote=2.0, max_model_bytes=150_000_000),
                  "int8"),
    "head-int4": (dict(quantize_tied=True, tied_bits=4, int8_kv=True, promote=2.0, max_model_bytes=150_000_000),
                  "int4"),
    "named": (dict(int8_nodes=["model.layers.1.mlp.down_proj"], max_model_bytes=None), "fp16"),
}


def tiny_llama(folder: Path) -> Path:
    """A 2-layer random LlamaForCausalLM (hidden 64, MLP 128, 4 heads / 2 KV heads, tied embeddings) as safetensors
    (once per folder)."""
    if not (folder / "model.safetensors").is_file():
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                          tie_word_embeddings=True)
        LlamaForCausalLM(cfg).eval().save_pretrained(str(folder), safe_serialization=True)
    return folder


def windows(seed: int = 2, n: int = 4) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, (n, SEQ)).astype(np.int64)


@dataclass(frozen=True)
class Measurements:
    spec: DecoderSpec
    source: TensorSource
    measured: Measured  # with sensitivities
    plain: Int4Facts  # the same facts without them (a rule set that promotes by none)


def measure_tiny(folder: Path) -> Measurements:
    """The layer-by-layer measurements of ``tiny_llama(folder)``, with and without sensitivities."""
    folder = tiny_llama(folder)
    spec = decoder_spec(json.loads((folder / "config.json").read_text()))
    source = open_safetensors(folder)
    kw = dict(context_length=CONTEXT, block_size=32, symmetric=False)
    measured = measure(spec, source, windows(), windows(3, 2), **kw)
    plain = measure(spec, source, windows(), windows(3, 2), sensitivities=False, **kw).facts
    return Measurements(spec, source, measured, plain)


def rules_of(case: str, max_model_bytes: int | None) -> Int4Rules:
    rules = {**CASES[case][0], "max_model_bytes": max_model_bytes}
    if rules.get("int8_nodes") is not None:
        rules["int8_nodes"] = frozenset(rules["int8_nodes"])
    return Int4Rules(setting=SETTING, fp16_initializers=TABLES, **rules)


def facts_for(m: Measurements, rules: Int4Rules) -> Int4Facts:
    """What a profile's rules decide from: sensitivities only where they can promote (as the recipe measures)."""
    return m.measured.facts if rules.promote is not None and rules.int8_nodes is None else m.plain


def profile(head: str) -> Profile:
    # The stored plans were written under an absolute 150 MB cap a tiny model never reaches. The relative budget
    # would bind here: the tiny layers' 8-bit K/V alone put them at 6.04 bits per weight, near the default 6.5.
    return load_profile("android-arm64", overrides={"llm.lm_head_precision": head, "llm.max_bits_per_weight": 32.0})


def node_plan(m: Measurements, int4: tuple[Int4Decision, ...], head: str, out: Path) -> PrecisionPlan:
    """Every node's precision in the package the plan gives (written as the recipe writes it, into ``out``)."""
    plan = {d.node: d for d in int4}
    spec, source = m.spec, m.source
    table = embedding_table(source)
    layers = quantized_layers(spec, source, embed(spec, table, windows()), plan, SETTINGS, context_length=CONTEXT)
    write_decoder(spec, out, table.astype(np.float16), layers, final_norm_weight(spec, source),
                  quantized_head(spec, source, m.measured, plan, SETTINGS), context_length=CONTEXT)
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False)
    return decide_decoder_precision(graph, plan, profile(head))


def as_rows(int4: tuple[Int4Decision, ...], nodes: PrecisionPlan | None = None) -> dict:
    rows = {"int4": [[d.node, d.bits, d.reason, d.k, d.n, d.sensitivity] for d in int4]}
    if nodes is not None:
        rows["nodes"] = [[d.name, d.op_type, d.category, d.role, str(d.precision), d.reason] for d in nodes.decisions]
    return rows


def tight_budget(m: Measurements) -> int:
    """The least max_model_bytes at which the tight-budget rules take their first promotion (layer 0's K/V
    projection), so that no other fits beside it."""
    first = "model.layers.0.attn.qkv_proj"
    lo, hi = 0, 150_000_000
    while hi - lo > 1:
        mid = (lo + hi) // 2
        rules = rules_of("tight-budget", mid)
        promoted = {d.node for d in decide_int4(facts_for(m, rules), rules) if d.bits == 8}
        lo, hi = (lo, mid) if first in promoted else (mid, hi)
    return hi


def write_expected(work: Path) -> dict:
    m = measure_tiny(work / "checkpoint")
    expected = {}
    for case, (rules, head) in CASES.items():
        budget = tight_budget(m) if rules["max_model_bytes"] == "tight" else rules["max_model_bytes"]
        r = rules_of(case, budget)
        int4 = decide_int4(facts_for(m, r), r)
        nodes = node_plan(m, int4, head, work / case)
        expected[case] = {"max_model_bytes": budget, "lm_head_precision": head, **as_rows(int4, nodes)}
    lines = ["{"]
    for i, (case, e) in enumerate(expected.items()):
        lines.append(f' {json.dumps(case)}: {{"max_model_bytes": {json.dumps(e["max_model_bytes"])}, '
                     f'"lm_head_precision": {json.dumps(e["lm_head_precision"])},')
        for key in ("int4", "nodes"):
            rows = ",\n".join(f"   {json.dumps(row)}" for row in e[key])
            lines.append(f'  "{key}": [\n{rows}\n  ]' + ("," if key == "int4" else ""))
        lines.append(" }" + ("," if i < len(expected) - 1 else ""))
    EXPECTED_FILE.write_text("\n".join(lines + ["}"]) + "\n")
    return expected


if __name__ == "__main__":
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        done = write_expected(Path(tmp))
    print(f"wrote {EXPECTED_FILE}: {', '.join(done)}", file=sys.stderr)
