"""The model families edgeq knows: one frozen entry per architecture, read by every check that depends on the family.

Input checks (``modelsource``: kind, refusals, GGUF architectures), onnxruntime-genai packaging (``llm/genai.py``:
the runtime model type), node roles (``categories.linear_role``) and the family tests all read this table;
``edgeq families`` prints it. ``verified`` says only what a test really covers (tests/test_families.py checks the
files it names).

Adding a causal-LM family: what its config means for the graph in ``edgeq/decoder/spec.py`` (and its tensors in
``decoder/layers.py``), an entry here (``_decoder``: model types, Hugging Face class, GGUF architecture if edgeq's
GGUF reader maps it, onnxruntime-genai type, the transformers that has it), and a tiny random checkpoint in
``tests/decoder/tiny.py`` (parity with transformers, greedy tokens through onnxruntime-genai) and
``tests/llm/tiny_families.py`` (``tests/llm/test_families.py`` exports it at INT4, and fails while a supported
family has none).
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass

ENCODER, CAUSAL_LM = "encoder", "causal-lm"
# The optimum task each kind exports as: encoders give last_hidden_state; causal LMs one decoder whose
# past_key_values inputs also serve prefill with an empty past.
TASKS = {ENCODER: "feature-extraction", CAUSAL_LM: "text-generation-with-past"}
OPTIMUM = "optimum"  # encoders: optimum-onnx's exporter over the PyTorch model
# causal LMs: edgeq.decoder builds the fused graph from config.json and streams the weights a tensor at a time
DECODER = "edgeq-decoder"
# transformers: optimum-onnx 0.1.0, which exports encoders, supports < 4.58; causal LMs (edgeq.decoder) were tested
# with both majors: the fast tests (tests/decoder, tests/llm/test_families.py, tests/recipes/test_causal_lm.py,
# tests/test_families.py) with 4.57.6 and with 5.24.0 (where the encoders' tests skip: no optimum-onnx there)
ENCODER_TRANSFORMERS = ">=4.50,<4.58"
TESTED_4, TESTED_5 = "4.57.6", "5.24.0"
# Linear-layer roles, in the order they are tried: attn_out before ffn_down, as the bert family's attention output
# (".../attention/output/dense/") also ends in the FFN's "output/dense".
ROLES = ("attn_qkv", "attn_out", "ffn_up", "ffn_down", "pooler", "lm_head")


@dataclass(frozen=True)
class LinearRole:
    role: str  # one of ROLES
    pattern: str  # regex searched in the exported node name


@dataclass(frozen=True)
class Refusal:
    reason: str  # why edgeq does not export it, with what was measured
    hint: str  # what the user can do instead


@dataclass(frozen=True)
class Family:
    name: str
    kind: str  # ENCODER | CAUSAL_LM
    model_types: tuple[str, ...]  # config.json model_type values
    architectures: tuple[str, ...]  # Hugging Face classes (config.json architectures) edgeq exports
    gguf_arch: str = ""  # GGUF general.architecture edgeq reads into this family ("": none)
    exporter: str = OPTIMUM
    # the transformers it exports with (PEP 440, as pip reads it): from the oldest that has the family (edgeq reads
    # its tokenizer, checks the checkpoint's tensors against the architecture and, for GGUF, converts the config with
    # it); an encoder's is capped by optimum-onnx 0.1.0 (the encoders extra in pyproject.toml), a causal LM's is not
    transformers: str = ENCODER_TRANSFORMERS  # "": a refused family, exported with none
    # the transformers releases the fast tests in ``verified`` passed with (docs/decisions/transformers-pin.md)
    transformers_tested: tuple[str, ...] = ()
    # onnxruntime-genai 0.18 model.type (src/models/model_type.h: IsLLM) of a causal LM (gpt2 and chatglm are LLM
    # types there too, with another cache layout)
    runtime_type: str = ""
    linear_roles: tuple[LinearRole, ...] = ()  # node-name patterns of its linear layers (in the exported graph)
    fusion: str = ""  # the fused ops its decoder is built with (causal LMs)
    fuses_attention: bool = False  # every attention block is a GroupQueryAttention
    limits: tuple[str, ...] = ()
    refusal: Refusal | None = None
    verified: tuple[str, ...] = ()  # what tests cover it; empty: accepted by model type, not exported by any test

    @property
    def supported(self) -> bool:
        return self.refusal is None

    @property
    def task(self) -> str:
        return TASKS[self.kind]

    def __post_init__(self) -> None:  # checked when the entry is made, as optimum's registry does
        if self.kind not in TASKS or not self.model_types or any(r.role not in ROLES for r in self.linear_roles):
            raise ValueError(f"family {self.name}: bad kind, model types or linear role")
        if self.kind == CAUSAL_LM and self.supported and not self.runtime_type:
            raise ValueError(f"family {self.name}: a supported causal LM needs its onnxruntime-genai type")


def _roles(*pairs: tuple[str, str]) -> tuple[LinearRole, ...]:
    return tuple(LinearRole(role, pattern) for role, pattern in pairs)


BERT_ROLES = _roles(("attn_qkv", r"/attention/self/(query|key|value)/"), ("attn_out", r"/attention/output/dense/"),
                    ("ffn_up", r"/intermediate/dense/"), ("ffn_down", r"/output/dense/"), ("pooler", r"/pooler/"))
# DeBERTa-v2 names its q/k/v query_proj/key_proj/value_proj, which no pattern takes: they stay "linear"
DEBERTA_ROLES = BERT_ROLES[1:4]
DISTILBERT_ROLES = _roles(("attn_qkv", r"/attention/(q_lin|k_lin|v_lin)/"), ("attn_out", r"/out_lin/"),
                          ("ffn_up", r"/lin1/"), ("ffn_down", r"/lin2/"))
MPNET_ROLES = _roles(("attn_qkv", r"/(q|k|v)/"), ("attn_out", r"/o/")) + BERT_ROLES[2:4]
# edgeq.decoder's node names (/model.layers.N.attn.qkv_proj/MatMulNBits, .../mlp.down_proj/..., /lm_head/MatMul)
LLAMA_ROLES = _roles(("attn_qkv", r"\.attn\.qkv_proj/"), ("attn_out", r"\.o_proj/"),
                     ("ffn_up", r"\.(up_proj|gate_proj)/"), ("ffn_down", r"\.down_proj/"), ("lm_head", r"/lm_head/"))

TINY_BERT = "tiny random BertModel (tests/tiny_models.py: tiny_bert)"
MINILM = ("real checkpoint: all-MiniLM-L6-v2 (slow: tests/test_minilm_slow.py, "
          "tests/qnn/test_minilm_qnn_slow.py)")
DECODER_FUSION = ("built fused: GroupQueryAttention (packed QKV, rotary inside, sliding windows), "
                  "SimplifiedLayerNormalization / SkipSimplifiedLayerNormalization, MatMulNBits")
CAUSAL_LM_HINT = "use a model of a supported causal-LM family ('edgeq families' lists them)"


def _encoder(name: str, arch: str, roles: tuple[LinearRole, ...] = BERT_ROLES, *verified: str,
             model_type: str = "") -> Family:
    return Family(name, ENCODER, (model_type or name,), (arch,), linear_roles=roles, verified=verified,
                  transformers_tested=(TESTED_4,) if verified else ())


DECODER_PARITY = ("tiny random model: FP32 logits vs transformers, greedy tokens through onnxruntime-genai "
                  "(tests/decoder/test_graph.py), INT4 export (tests/llm/test_families.py)")
GGUF_READER = "tiny GGUF: every tensor equals transformers' GGUF loader (tests/decoder/test_gguf_weights.py)"
# A GGUF architecture "works end to end" where a test exports a GGUF of it with --gguf-file (the README's list is
# gguf_archs_exported(), checked by tests/test_readme.py). Phi-3's is not: the tiny writer's byte-level BPE vocabulary
# is not what llama.cpp writes for Phi-3 (SentencePiece), and transformers converts it into a tokenizer the package's
# tokenizer does not reproduce.
GGUF_EXPORT = "tiny GGUF exported end to end with --gguf-file (tests/test_families.py)"


def _decoder(name: str, arch: str, gguf_arch: str = "", *, model_types: tuple[str, ...] = (), runtime_type: str = "",
             transformers: str, limits: tuple[str, ...] = (), verified: tuple[str, ...] = (DECODER_PARITY,)) -> Family:
    """A causal LM that edgeq.decoder builds (every one: the fused graph from config.json)."""
    return Family(name, CAUSAL_LM, model_types or (name,), (arch,), gguf_arch=gguf_arch, exporter=DECODER,
                  transformers=transformers, transformers_tested=(TESTED_4, TESTED_5),
                  runtime_type=runtime_type or name, linear_roles=LLAMA_ROLES,
                  fusion=DECODER_FUSION, fuses_attention=True, limits=limits, verified=verified)


FAMILIES: tuple[Family, ...] = (
    _encoder("bert", "BertModel", BERT_ROLES, TINY_BERT, MINILM),
    _encoder("roberta", "RobertaModel"),
    _encoder("xlm-roberta", "XLMRobertaModel"),
    _encoder("camembert", "CamembertModel"),
    _encoder("electra", "ElectraModel"),
    _encoder("distilbert", "DistilBertModel", DISTILBERT_ROLES),
    _encoder("mpnet", "MPNetModel", MPNET_ROLES),
    _encoder("albert", "AlbertModel", ()),  # attention/query, ffn, ffn_output: no role pattern names them
    _encoder("deberta-v2", "DebertaV2Model", DEBERTA_ROLES),
    _encoder("nomic_bert", "NomicBertModel", ()),  # Wqkv, out_proj, fc11/fc12/fc2: no role pattern names them
    _decoder("llama", "LlamaForCausalLM", "llama", transformers=">=4.50",  # 4.50: edgeq's floor
             limits=("GGUF: Llama-3.x's rope_freqs and rope scaling are lost in transformers' GGUF config (use the "
                     "safetensors checkpoint for Llama 3.x)",),
             verified=(DECODER_PARITY, GGUF_READER, GGUF_EXPORT,
                       "real checkpoint: SmolLM2-135M-Instruct Q4_1 GGUF (slow: tests/llm/test_smollm2_export.py)")),
    _decoder("mistral", "MistralForCausalLM", transformers=">=4.50",
             limits=("no GGUF input: llama.cpp writes Mistral models as arch 'llama', which edgeq reads",)),
    _decoder("qwen2", "Qwen2ForCausalLM", "qwen2", transformers=">=4.50",
             limits=("use_sliding_window=true is refused (released checkpoints set it false)",),
             verified=(DECODER_PARITY, GGUF_READER, GGUF_EXPORT)),
    _decoder("qwen3", "Qwen3ForCausalLM", transformers=">=4.51",
             limits=("no GGUF input (edgeq's GGUF reader maps llama, qwen2 and phi3 tensors)",)),
    _decoder("phi3", "Phi3ForCausalLM", "phi3", transformers=">=4.50",
             limits=("LongRoPE models: context length <= original_max_position_embeddings (the short factors)",
                     "partial rotary: half the rotary dimension a multiple of 8 (GroupQueryAttention)"),
             verified=(DECODER_PARITY, GGUF_READER)),
    _decoder("gemma", "GemmaForCausalLM", transformers=">=4.50",
             limits=("no GGUF input (edgeq's GGUF reader maps llama, qwen2 and phi3 tensors)",)),
    _decoder("smollm3", "SmolLM3ForCausalLM", transformers=">=4.53",
             limits=("no GGUF input (edgeq's GGUF reader maps llama, qwen2 and phi3 tensors)",)),
    _decoder("gemma3", "Gemma3ForCausalLM", model_types=("gemma3_text",), runtime_type="gemma3_text",
             transformers=">=4.50",
             limits=("text only: model_type gemma3_text (the multimodal gemma3 checkpoints are not read)",
                     "no GGUF input (edgeq's GGUF reader maps llama, qwen2 and phi3 tensors)")),
    Family("gemma3-multimodal", CAUSAL_LM, ("gemma3",), ("Gemma3ForConditionalGeneration",), gguf_arch="gemma3",
           exporter=DECODER, transformers="", transformers_tested=(), linear_roles=LLAMA_ROLES,
           refusal=Refusal(
               "edgeq exports Gemma-3 from its text checkpoint (model_type gemma3_text, safetensors); it reads neither "
               "the multimodal gemma3 checkpoints nor Gemma-3 GGUF files (its GGUF reader maps llama, qwen2 and "
               "phi3 tensors)",
               "use the Gemma-3 text checkpoint's safetensors folder (config.json model_type gemma3_text)"),
           verified=("refusal: tiny GGUF (tests/test_families.py)",)),
    Family("gemma2", CAUSAL_LM, ("gemma2",), ("Gemma2ForCausalLM",), gguf_arch="gemma2", runtime_type="gemma2",
           exporter=DECODER, transformers="", transformers_tested=(), linear_roles=LLAMA_ROLES,
           refusal=Refusal(
               "edgeq's decoder builder has no Gemma-2 yet (attention logit soft-capping, alternating sliding "
               "windows and its four norms per layer are not built or tested for it)",
               CAUSAL_LM_HINT + " (Gemma-3 is)"),
           verified=("refusal: tiny random model (tests/llm/test_families.py), tiny GGUF (tests/test_families.py)",)),
)



def _index(keys: list[tuple[str, Family]], what: str) -> dict[str, Family]:
    """key -> family, refusing a key claimed by two families (a lookup must have one answer)."""
    index: dict[str, Family] = {}
    for key, family in keys:
        if key in index:
            raise ValueError(f"{what} {key!r} is in two families: {index[key].name}, {family.name}")
        index[key] = family
    return index


_BY_MODEL_TYPE = _index([(t, f) for f in FAMILIES for t in f.model_types], "model_type")
_BY_GGUF_ARCH = _index([(f.gguf_arch, f) for f in FAMILIES if f.gguf_arch], "GGUF architecture")


def by_model_type(model_type: str) -> Family | None:
    return _BY_MODEL_TYPE.get(model_type)


def by_gguf_arch(arch: str) -> Family | None:
    return _BY_GGUF_ARCH.get(arch)


def supported_model_types(kind: str) -> list[str]:
    """The model types edgeq exports of one kind, sorted: what a refusal's hint lists."""
    return sorted(t for f in FAMILIES if f.kind == kind and f.supported for t in f.model_types)


def supported_gguf_archs() -> list[str]:
    return sorted(f.gguf_arch for f in FAMILIES if f.gguf_arch and f.supported)


def gguf_archs_exported() -> list[str]:
    """The GGUF architectures a test exports end to end (the others' tensors are read, their export is untested)."""
    return sorted(f.gguf_arch for f in FAMILIES if f.gguf_arch and f.supported and GGUF_EXPORT in f.verified)


def linear_roles() -> tuple[tuple[str, str, tuple[str, ...]], ...]:
    """(role, pattern, families using it) over every family, in ROLES order: the first match names a node's role.
    Node names carry no family, so one table serves all; no two roles' patterns match the same node name."""
    users: dict[tuple[str, str], list[str]] = {}
    for f in FAMILIES:
        for r in f.linear_roles:
            users.setdefault((r.role, r.pattern), []).append(f.name)
    ordered = sorted(users.items(), key=lambda item: ROLES.index(item[0][0]))
    return tuple((role, pattern, tuple(names)) for (role, pattern), names in ordered)


LINE = 100  # `edgeq families` keeps within this many columns


def describe(f: Family) -> dict:
    """One family as plain data (``edgeq families --json``)."""
    return {"name": f.name, "kind": f.kind, "model_types": list(f.model_types), "architectures": list(f.architectures),
            "gguf_arch": f.gguf_arch, "exporter": f.exporter, "transformers": f.transformers,
            "transformers_tested": list(f.transformers_tested), "runtime_type": f.runtime_type,
            "status": "supported" if f.supported else "refused",
            "reason": f.refusal.reason if f.refusal else "", "hint": f.refusal.hint if f.refusal else "",
            "linear_roles": [[r.role, r.pattern] for r in f.linear_roles], "fusion": f.fusion,
            "limits": list(f.limits), "verified": list(f.verified)}


def table_lines() -> list[str]:
    """``edgeq families``: a line per family (name, kind, model types, GGUF arch, exporter, runtime type, status),
    then indented lines for the refusal reason, limits and what verifies it, each within LINE columns."""
    rows = [("FAMILY", "KIND", "MODEL TYPES", "GGUF", "EXPORTER", "RUNTIME", "STATUS")]
    rows += [(f.name, f.kind, ",".join(f.model_types), f.gguf_arch or "-", f.exporter, f.runtime_type or "-",
              "supported" if f.supported else "REFUSED") for f in FAMILIES]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(rows[0], widths)).rstrip()]
    for f, row in zip(FAMILIES, rows[1:]):
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        details = ([f"refused: {f.refusal.reason}"] if f.refusal else []) + [f"limit: {t}" for t in f.limits] + \
            [f"verified: {'; '.join(f.verified) or 'no test exports one (accepted by model type)'}"] + \
            ([f"transformers {f.transformers}" + (f" (fast tests passed with {', '.join(f.transformers_tested)})"
                                                  if f.transformers_tested else "")] if f.supported else [])
        for text in details:
            lines += textwrap.wrap(text, LINE, initial_indent="    ", subsequent_indent="      ",
                                   break_on_hyphens=False)
    return lines
