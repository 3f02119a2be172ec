"""The model families edgeq knows: one frozen entry per architecture, read by every check that depends on the family.

Input checks (``modelsource``: kind, refusals, GGUF architectures), the GGUF loader (``llm/gguf_source.py``),
onnxruntime-genai packaging (``llm/genai.py``: the runtime model type), node roles (``categories.linear_role``) and
the family tests (``tests/llm/test_families.py``: what FuseLLM fuses) all read this table; ``edgeq families``
prints it. ``verified`` says only what a test really covers (tests/test_families.py checks the files it names).

Adding a causal-LM family: an entry here (its model types, Hugging Face class, GGUF architecture if transformers
loads one, onnxruntime-genai type, role patterns, what FuseLLM fuses), and a tiny random model of it in
``tests/llm/tiny_families.py``: ``tests/llm/test_families.py`` then runs it through export, fusion, packaging and
greedy generation, and fails while a supported family has no tiny model.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass

ENCODER, CAUSAL_LM = "encoder", "causal-lm"
# The optimum task each kind exports as: encoders give last_hidden_state; causal LMs one decoder whose
# past_key_values inputs also serve prefill with an empty past.
TASKS = {ENCODER: "feature-extraction", CAUSAL_LM: "text-generation-with-past"}
OPTIMUM = "optimum"  # every family today; issue 14 adds another exporter as a value of Family.exporter
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
    gguf_arch: str = ""  # GGUF general.architecture that transformers 4.57 loads into this family ("": none)
    exporter: str = OPTIMUM
    # onnxruntime-genai 0.18 model.type (src/models/model_type.h: IsLLM) of a causal LM whose optimum export has the
    # standard KV-cache I/O (gpt2 and chatglm are LLM types there too, with another cache layout)
    runtime_type: str = ""
    linear_roles: tuple[LinearRole, ...] = ()  # node-name patterns of its linear layers (optimum's export)
    fusion: str = ""  # what FuseLLM does to its decoder (causal LMs)
    fuses_attention: bool = False  # FuseLLM turns every attention block into GroupQueryAttention
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
LLAMA_ROLES = _roles(("attn_qkv", r"/(q_proj|k_proj|v_proj)/"), ("attn_out", r"/o_proj/"),
                     ("ffn_up", r"/(up_proj|gate_proj)/"), ("ffn_down", r"/down_proj/"),
                     ("lm_head", r"/lm_head/"))  # a tied head reads Transpose(embedding table)
# Phi-3 packs qkv_proj and gate_up_proj, which the patterns leave as "linear"
PHI3_ROLES = tuple(r for r in LLAMA_ROLES if r.role not in ("attn_qkv", "ffn_up"))

TINY_BERT = "tiny random BertModel (tests/tiny_models.py: tiny_bert)"
MINILM = ("real checkpoint: all-MiniLM-L6-v2 (slow: tests/test_minilm_slow.py, "
          "tests/qnn/test_minilm_qnn_slow.py)")
TINY_FAMILY = "tiny random model (tests/llm/tiny_families.py, tests/llm/test_families.py)"
FULL_FUSION = "GroupQueryAttention (packed QKV) and RMSNorms"
CAUSAL_LM_HINT = "use a model of a supported causal-LM family ('edgeq families' lists them)"


def _encoder(name: str, arch: str, roles: tuple[LinearRole, ...] = BERT_ROLES, *verified: str,
             model_type: str = "") -> Family:
    return Family(name, ENCODER, (model_type or name,), (arch,), linear_roles=roles, verified=verified)


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
    Family("llama", CAUSAL_LM, ("llama",), ("LlamaForCausalLM",), gguf_arch="llama", runtime_type="llama",
           linear_roles=LLAMA_ROLES, fusion=FULL_FUSION, fuses_attention=True,
           verified=("tiny random model (tests/llm/tiny_llama.py, tests/llm/tiny_families.py)",
                     "real checkpoint: SmolLM2-135M-Instruct Q4_1 GGUF (slow: tests/llm/test_smollm2_export.py)")),
    Family("mistral", CAUSAL_LM, ("mistral",), ("MistralForCausalLM",), gguf_arch="mistral", runtime_type="mistral",
           linear_roles=LLAMA_ROLES, fusion=FULL_FUSION, fuses_attention=True,
           limits=("context length <= sliding_window where the config sets one (edgeq's attention has no window)",),
           verified=(TINY_FAMILY,)),
    Family("qwen2", CAUSAL_LM, ("qwen2",), ("Qwen2ForCausalLM",), gguf_arch="qwen2", runtime_type="qwen2",
           linear_roles=LLAMA_ROLES,
           fusion=FULL_FUSION + "; q/k/v biases become one Add of the packed bias (GroupQueryAttention takes none)",
           fuses_attention=True, limits=("context length <= sliding_window when use_sliding_window is true",),
           verified=(TINY_FAMILY,)),
    Family("phi3", CAUSAL_LM, ("phi3",), ("Phi3ForCausalLM",), gguf_arch="phi3", runtime_type="phi3",
           linear_roles=PHI3_ROLES,
           fusion="RMSNorms only: attention (packed qkv_proj split by Slice, partial-rotary Concat) is left "
                  "unfused and reported",
           limits=("LongRoPE models: context length <= original_max_position_embeddings (the export keeps only "
                   "the short factors)",),
           verified=(TINY_FAMILY,)),
    Family("gemma", CAUSAL_LM, ("gemma",), ("GemmaForCausalLM",), runtime_type="gemma", linear_roles=LLAMA_ROLES,
           fusion=FULL_FUSION + "; rotary tables evaluated for an empty past (the export counts positions from "
                                "the cache)",
           fuses_attention=True, limits=("no GGUF input: transformers 4.57 loads no 'gemma' GGUF",),
           verified=(TINY_FAMILY,)),
    Family("smollm3", CAUSAL_LM, ("smollm3",), ("SmolLM3ForCausalLM",), runtime_type="smollm3",
           linear_roles=LLAMA_ROLES, fusion=FULL_FUSION + "; NoPE layers (no rotary) with do_rotary=0",
           fuses_attention=True,
           limits=("no GGUF input: transformers 4.57 loads no 'smollm3' GGUF",), verified=(TINY_FAMILY,)),
    Family("gemma2", CAUSAL_LM, ("gemma2",), ("Gemma2ForCausalLM",), gguf_arch="gemma2", runtime_type="gemma2",
           linear_roles=LLAMA_ROLES,
           refusal=Refusal(
               "optimum's Gemma-2 export drops the attention logit soft-capping (config attn_logit_softcapping; "
               "measured: no Tanh before the attention softmax of the exported graph, as transformers' SDPA "
               "attention ignores it), so the package would differ from the model wherever a score nears the cap",
               "Gemma-2 needs an export with eager attention and soft-capping in GroupQueryAttention (softcap, "
               "local_window_size), which edgeq does not do yet; " + CAUSAL_LM_HINT),
           verified=("refusal: tiny random model (tests/llm/test_families.py), tiny GGUF (tests/test_families.py)",)),
    Family("gemma3", CAUSAL_LM, ("gemma3_text", "gemma3"), ("Gemma3ForCausalLM",), gguf_arch="gemma3",
           linear_roles=LLAMA_ROLES,
           refusal=Refusal(
               "edgeq has no onnxruntime-genai packaging for Gemma-3 and no test of its export (a real Gemma-3 "
               "GGUF ran 16.5 minutes before packaging refused model_type 'gemma3_text')",
               CAUSAL_LM_HINT + "; adding Gemma-3 to edgeq takes a registry entry in edgeq/families.py and a "
               "tiny-model test in tests/llm/test_families.py"),
           verified=("refusal: tiny GGUF (tests/test_families.py)",)),
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


def linear_roles() -> tuple[tuple[str, str, tuple[str, ...]], ...]:
    """(role, pattern, families using it) over every family, in ROLES order: the first match names a node's role.
    Node names carry no family, so one table serves all; no two roles' patterns match the same optimum name."""
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
            "gguf_arch": f.gguf_arch, "exporter": f.exporter, "runtime_type": f.runtime_type,
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
            [f"verified: {'; '.join(f.verified) or 'no test exports one (accepted by model type)'}"]
        for text in details:
            lines += textwrap.wrap(text, LINE, initial_indent="    ", subsequent_indent="      ",
                                   break_on_hyphens=False)
    return lines
