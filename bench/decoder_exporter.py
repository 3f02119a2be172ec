"""Benchmark: decoder exporters against transformers' forward on tiny random checkpoints, per family
(docs/decisions/decoder-exporter.md holds the numbers and the decision).

Stages, each run by the interpreter that has what it needs (OUT is a scratch folder, never the repo):

    /work/main/.venv/bin/python bench/decoder_exporter.py checkpoints OUT   # transformers 4.57: tiny models + refs
    /work/venvs/mobius/bin/python bench/decoder_exporter.py mobius OUT cpu  # mobius FP32, --ep cpu|default
    PYTHONPATH=. /work/main/.venv/bin/python bench/decoder_exporter.py optimum OUT  # optimum-onnx, unfused
    PYTHONPATH=. /work/main/.venv/bin/python bench/decoder_exporter.py graph OUT  # edgeq/decoder
    python bench/decoder_exporter.py table OUT
    python3 bench/decoder_exporter.py capped OUT LABEL CAP_GB TIMEOUT_S COMMAND...  # time + peak RSS, killed at cap

The optimum stage measures optimum-onnx's export as it is: the decision record's "optimum + FuseLLM" rows were
measured with edgeq's whole-graph fusion pass, since removed (one pipeline: edgeq.decoder builds every causal LM).

Per variant and exporter: max |logits - transformers| / max |transformers| and argmax agreement over four prompts
(6 tokens, the chat prompt, 48 and 100 tokens: longer than Gemma-3's sliding window of 8 and Phi-3's LongRoPE
original length of 64), the fused-op counts, and onnxruntime-genai 0.18's 16 greedy tokens against transformers'
generate.

At scale (a 1B-shaped BF16 checkpoint CKPT and an exporter's package PKG), one prompt of 32 ids:

    /work/main/.venv/bin/python bench/decoder_exporter.py scale-ref CKPT REF.npz   # transformers FP32 + generate
    /work/venvs/mobius/bin/python bench/decoder_exporter.py scale-onnx PKG REF.npz  # ONNX prefill + genai greedy
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FUSED_OPS = ("GroupQueryAttention", "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization",
             "RotaryEmbedding", "MatMulNBits", "MultiHeadAttention", "Attention")
GREEDY_TOKENS = 16
PROMPTS = ("p6", "chat", "p48", "p100")
# variant -> (tiny_families key it derives from, config class, model class, config overrides)
LONGROPE = {"type": "longrope", "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5],
            "long_factor": [2.0, 3.0, 4.5, 6.0, 8.0, 10.0]}
LONGROPE8 = {"type": "longrope", "short_factor": [1.0, 1.05, 1.1, 1.2, 1.4, 1.7, 2.0, 2.5],
             "long_factor": [1.5, 2.0, 3.0, 4.5, 6.0, 8.0, 10.0, 12.0]}
VARIANTS = {
    "llama": ("llama", None, None, {}),
    "llama_rope3": ("llama", None, None, dict(rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192})),
    "mistral": ("mistral", None, None, {}),
    "qwen2": ("qwen2", None, None, {}),
    "qwen3": ("qwen3", "Qwen3Config", "Qwen3ForCausalLM", dict(tie_word_embeddings=True, head_dim=16)),
    "smollm3": ("smollm3", None, None, {}),
    "gemma3_text": ("gemma3_text", "Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        tie_word_embeddings=True, head_dim=16, sliding_window=8, query_pre_attn_scalar=16,
        layer_types=["sliding_attention", "full_attention"], rope_theta=1e6, rope_local_base_freq=10000.0,
        rope_scaling={"rope_type": "linear", "factor": 8.0}, hidden_activation="gelu_pytorch_tanh")),
    "phi3": ("phi3", None, None, {}),
    "phi3_longrope": ("phi3", None, None, dict(rope_scaling=LONGROPE8, original_max_position_embeddings=64)),
    "phi3_partial_longrope": ("phi3", None, None, dict(partial_rotary_factor=0.75, rope_scaling=LONGROPE,
                                                       original_max_position_embeddings=64)),
}


def prompts(src: Path) -> dict[str, list[int]]:
    from tests.llm.test_genai import chat_ids

    return {"p6": [(9 + 13 * i) % 600 for i in range(6)], "chat": chat_ids(src),
            "p48": [(5 + 7 * i) % 600 for i in range(48)],
            "p100": [(3 + 11 * i) % 600 for i in range(100)]}


def write_checkpoints(out: Path) -> None:
    """Tiny random checkpoints (tests/llm/tiny_families.py's recipe) and transformers 4.57's logits / greedy ids."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from tests.llm import tiny_families as tf
    from tests.llm.test_genai import torch_greedy

    for name, (base, cfg_cls, model_cls, extra) in VARIANTS.items():
        if (out / name / "ref.json").is_file():
            continue
        if cfg_cls is None:
            cfg_cls, model_cls, base_extra = tf.FAMILIES[base]
        else:
            base_extra = {}
        tf.FAMILIES[name] = (cfg_cls, model_cls, base_extra | extra)
        src = tf.tiny_family(name, out / name / "src")
        ids = prompts(src)
        model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
        with torch.no_grad():
            refs = {k: model(torch.tensor([v])).logits[0].numpy() for k, v in ids.items()}
        greedy, margin = torch_greedy(src, ids["chat"], GREEDY_TOKENS)
        np.savez(out / name / "ref.npz", **refs)
        (out / name / "ref.json").write_text(json.dumps({"prompts": ids, "greedy": greedy, "margin": margin}))
        print(name, "greedy margin", round(margin, 4), flush=True)


def session_logits(model_path: Path, ids: list[int]):
    """Prefill logits of ``ids`` through an ONNX decoder with an empty KV cache (any of the exporters' input sets)."""
    import numpy as np
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
    feeds = {}
    for inp in sess.get_inputs():
        if inp.name == "input_ids":
            feeds[inp.name] = np.array([ids], np.int64)
        elif inp.name == "attention_mask":
            feeds[inp.name] = np.ones((1, len(ids)), np.int64)
        elif inp.name == "position_ids":
            feeds[inp.name] = np.arange(len(ids), dtype=np.int64)[None]
        elif inp.name.startswith("past"):
            shape = [d if isinstance(d, int) else (1 if k == 0 else 0) for k, d in enumerate(inp.shape)]
            dtype = np.float16 if "float16" in inp.type else np.float32
            feeds[inp.name] = np.zeros(shape, dtype)
        else:
            raise ValueError(f"unknown input {inp.name} {inp.shape}")
    return sess.run(["logits"], feeds)[0][0].astype(np.float32)


def og_greedy(package: Path, ids: list[int], n: int) -> list[int]:
    import onnxruntime_genai as og

    model = og.Model(str(package))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + n, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(ids)
    out = []
    while not gen.is_done() and len(out) < n:
        gen.generate_next_token()
        out.append(int(gen.get_next_tokens()[0]))
    return out


def measure(name: str, folder: Path, model_path: Path, package: Path | None) -> dict:
    """Parity, argmax agreement and fused-op counts of ``model_path``, greedy ids through ``package``."""
    import numpy as np
    import onnx

    ref = np.load(folder / "ref.npz")
    meta = json.loads((folder / "ref.json").read_text())
    row: dict = {"variant": name, "prompts": {}}
    for key, ids in meta["prompts"].items():
        try:
            got = session_logits(model_path, ids)
        except Exception as exc:  # noqa: BLE001 -- an invalid graph is a result, kept as text for the table
            if key == "p6":
                return row | {"build_error": f"onnxruntime: {type(exc).__name__}: {exc}"[-300:]}
            row["prompts"][key] = {"tokens": len(ids), "error": f"{type(exc).__name__}: {exc}"[-200:]}
            continue
        want = ref[key]
        rel = float(np.abs(got - want).max() / np.abs(want).max())
        agree = float((got.argmax(-1) == want.argmax(-1)).mean())
        row["prompts"][key] = {"tokens": len(ids), "rel": rel, "argmax": agree}
    graph = onnx.load(str(model_path), load_external_data=False).graph
    ops = Counter(n.op_type for n in graph.node)
    row["ops"] = {op: ops[op] for op in FUSED_OPS if ops[op]}
    row["nodes"] = len(graph.node)
    if package is not None:
        try:
            got = og_greedy(package, meta["prompts"]["chat"], GREEDY_TOKENS)
            row["greedy_equal"] = got == meta["greedy"]
            row["greedy"] = got
        except Exception as exc:  # noqa: BLE001 -- what fails is the measurement, kept as text for the table
            row["greedy_error"] = f"{type(exc).__name__}: {exc}"[:300]
    row["ref_greedy"], row["margin"] = meta["greedy"], meta["margin"]
    return row


def run_mobius(out: Path, ep: str = "cpu") -> None:
    """``ep``: cpu (GroupQueryAttention and the other contrib-op rewrites) or default (portable ONNX)."""
    rows = []
    for name in VARIANTS:
        folder = out / name
        dst = folder / f"mobius_{ep}"
        start = time.time()
        proc = subprocess.run([sys.executable, "-m", "mobius", "build", "--config", str(folder / "src"), str(dst),
                               "--dtype", "f32", "--ep", ep, "--runtime", "ort-genai"],
                              capture_output=True, text=True)
        if proc.returncode:
            rows.append({"variant": name, "build_error": proc.stderr.strip().splitlines()[-1][:300]})
            print(name, rows[-1], flush=True)
            continue
        row = measure(name, folder, dst / "model.onnx", dst)
        row["build_s"] = round(time.time() - start, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    (out / f"mobius_{ep}.json").write_text(json.dumps(rows, indent=1))


def run_optimum(out: Path) -> None:
    """optimum-onnx's text-generation-with-past export, unfused, packaged for onnxruntime-genai."""
    from tests.llm.test_genai import make_package, optimum_export

    rows = []
    for name in VARIANTS:
        folder = out / name
        config = json.loads((folder / "src" / "config.json").read_text())
        try:
            exported = optimum_export(folder / "src", folder / "optimum")
            try:
                # a LongRoPE model's package is refused past the original length (the export keeps short factors)
                context = min(128, config.get("original_max_position_embeddings") or 128)
                shutil.rmtree(folder / "optimum_pkg", ignore_errors=True)
                package = make_package(folder / "src", exported, folder / "optimum_pkg", context)
            except Exception as exc:  # noqa: BLE001
                package = None
                print(name, "packaging:", exc, flush=True)
            row = measure(name, folder, exported, package)
        except Exception as exc:  # noqa: BLE001
            row = {"variant": name, "build_error": f"{type(exc).__name__}: {exc}"[:300]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    (out / "optimum.json").write_text(json.dumps(rows, indent=1))


def run_graph(out: Path) -> None:
    """edgeq's own builder (edgeq/decoder/), FP32."""
    from edgeq.decoder.graph import write_fp32_decoder
    from edgeq.decoder.spec import decoder_spec
    from edgeq.decoder.weights import open_safetensors
    from edgeq.llm.tokenizer import write_package_tokenizer

    rows = []
    for name in VARIANTS:
        folder, dst = out / name, out / name / "graph"
        start = time.time()
        try:
            config = json.loads((folder / "src" / "config.json").read_text())
            spec, source = decoder_spec(config), open_safetensors(folder / "src")
            shutil.rmtree(dst, ignore_errors=True)
            gen = json.loads((folder / "src" / "generation_config.json").read_text())
            context = min(128, config.get("original_max_position_embeddings") or 128)
            model = write_fp32_decoder(spec, source, dst, context_length=context, generation_config=gen)
            write_package_tokenizer(folder / "src", dst)
            row = measure(name, folder, model, dst)
        except Exception as exc:  # noqa: BLE001
            row = {"variant": name, "build_error": f"{type(exc).__name__}: {exc}"[:300]}
        row["build_s"] = round(time.time() - start, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    (out / "graph.json").write_text(json.dumps(rows, indent=1))


SCALE_IDS = [(17 + 31 * i) % 128000 for i in range(32)]


def scale_ref(ckpt: Path, npz: Path) -> None:
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    ids = torch.tensor([SCALE_IDS])
    with torch.no_grad():
        logits = model(ids).logits[0].numpy()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                             output_scores=True, return_dict_in_generate=True)
    margins = [float(v[0] - v[1]) for v in (s[0].topk(2).values for s in out.scores)]
    np.savez(npz, logits=logits, greedy=out.sequences[0, len(SCALE_IDS):].numpy(), margins=np.array(margins))


def scale_onnx(package: Path, npz: Path) -> None:
    import numpy as np

    ref = np.load(npz)
    got, want = session_logits(package / "model.onnx", SCALE_IDS), ref["logits"]
    greedy = og_greedy(package, SCALE_IDS, len(ref["greedy"]))
    print(json.dumps({"rel": float(np.abs(got - want).max() / np.abs(want).max()),
                      "argmax": float((got.argmax(-1) == want.argmax(-1)).mean()),
                      "greedy_equal": greedy == ref["greedy"].tolist(), "min_margin": float(ref["margins"].min())}))


def tree_rss_kb(pid: int) -> int:
    """Resident set of ``pid`` and its descendants (a capped run is killed on the sum, as the machine sees it)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            total += next((int(ln.split()[1]) for ln in status.splitlines() if ln.startswith("VmRSS")), 0)
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def capped(out: Path, label: str, cap_gb: str, timeout_s: str, *cmd: str) -> None:
    """Run ``cmd`` under /usr/bin/time -v, killed past ``cap_gb`` GB of resident memory or ``timeout_s`` seconds;
    appends wall time, peak RSS and the outcome to OUT/scale.jsonl (the log beside it)."""
    import os
    import signal

    log = out / f"scale-{label}.log"
    start, peak_kb, why = time.time(), 0, None
    with log.open("w") as fh:
        proc = subprocess.Popen(["/usr/bin/time", "-v", *cmd], stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True, env=os.environ | {"HF_HUB_OFFLINE": "1"})
        while proc.poll() is None:
            peak_kb = max(peak_kb, tree_rss_kb(proc.pid))
            if peak_kb > float(cap_gb) * 1e6 or time.time() - start > float(timeout_s):
                why = f"killed: peak RSS {peak_kb / 1e6:.1f} GB > cap {cap_gb}" if peak_kb > float(cap_gb) * 1e6 \
                    else f"killed: timeout {timeout_s} s"
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                break
            time.sleep(0.5)
    text = log.read_text()
    max_rss = [int(ln.split(":")[1]) for ln in text.splitlines() if "Maximum resident set size" in ln]
    row = {"label": label, "command": " ".join(cmd), "exit": proc.returncode, "wall_s": round(time.time() - start, 1),
           "peak_rss_gb": round(max(max_rss + [peak_kb]) / 1e6, 2), "outcome": why or (
               "ok" if proc.returncode == 0 else text.strip().splitlines()[-25:][0][:300])}
    with (out / "scale.jsonl").open("a") as fh:
        fh.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


def table(out: Path) -> None:
    for which in ("mobius_cpu", "mobius_default", "optimum", "graph"):
        path = out / f"{which}.json"
        if not path.is_file():
            continue
        print(f"\n{which}\n| variant | rel p6 / chat / p48 / p100 | argmax p6 / chat / p48 / p100 | greedy (margin) "
              "| fused ops |")
        print("|---|---|---|---|---|")
        for row in json.loads(path.read_text()):
            if "build_error" in row:
                print(f"| {row['variant']} | build failed: {row['build_error']} | | | |")
                continue
            p = row["prompts"]
            rel = " / ".join(f"{p[k]['rel']:.1e}" if "rel" in p[k] else "fails" for k in PROMPTS)
            agree = " / ".join(f"{p[k]['argmax']:.2f}" if "rel" in p[k] else "-" for k in PROMPTS)
            greedy = ("equal" if row.get("greedy_equal") else "DIFFER" if "greedy_equal" in row
                      else row.get("greedy_error", "no package")[:80])
            ops = ", ".join(f"{k} {v}" for k, v in row["ops"].items())
            print(f"| {row['variant']} | {rel} | {agree} | {greedy} ({row['margin']:.3f}) | {ops} |")


STAGES = ("checkpoints", "mobius", "optimum", "graph", "table", "capped", "scale-ref", "scale-onnx")

if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] not in STAGES:
        print(__doc__)
        raise SystemExit(0 if len(sys.argv) > 1 and sys.argv[1] in ("-h", "--help") else 2)
    stage, out_dir, *rest = sys.argv[1:]
    sys.path.append(str(ROOT))  # after PYTHONPATH: the graph stage imports edgeq from another checkout
    {"checkpoints": write_checkpoints, "mobius": run_mobius, "optimum": run_optimum, "graph": run_graph,
     "table": table, "capped": capped, "scale-ref": scale_ref, "scale-onnx": scale_onnx}[stage](
        Path(out_dir), *rest)
