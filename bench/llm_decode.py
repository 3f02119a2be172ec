"""Decode and prefill speed of onnxruntime-genai packages on the CPU EP, one subprocess per run.

    python bench/llm_decode.py --package DIR [--package DIR ...] --baseline DIR \\
        [--prompt-tokens 128 --new-tokens 128 --repeats 3] [--json OUT.json]

Each (package, repeat) runs in a fresh child process that loads the package with onnxruntime-genai, does one short
warm-up generation (same prompt, 4 tokens), then appends ``--prompt-tokens`` prompt ids (prefill, timed) and greedily generates
``--new-tokens`` tokens (decode, timed per token; EOS is held off with min_length so every run decodes the same
count), on ``--threads`` intra-op threads. Runs are interleaved (bench/runs.py: round-robin, each round starting one
package later) so drift in background load spreads over all packages; the table reports the median of the runs the
outlier rule keeps (bench/runs.py, dropped runs rerun) with their range. Peak RSS is the child's own, measured
through bench/measure.py's launcher (not inherited from this process, which may have built packages). The prompt is token
ids (from the package's tokenizer.json via the ``tokenizers`` library when available), fed with ``append_tokens``:
onnxruntime-genai's tokenizer can map spaces to -1 with GGUF-derived tokenizers.

Build modes (packages for the comparison):

    --build-baseline SRC_ONNX_DIR OUT_DIR   optimum export + ORT RTN int4 (block 32, symmetric, accuracy_level 4)
    --build-fused MODEL_DIR OUT_DIR [--gguf-file NAME] [--head int4|int8|fp32] [--precision int4|fp32]
                                            edgeq.decoder's fused FP32 graph (float layers), then ORT's
                                            MatMulNBitsQuantizer RTN int4 as above (lm_head int4, 8-bit or kept
                                            FP32), or FP32: the fused-RTN peer row
    --build-fp32 SRC_ONNX_DIR OUT_DIR       the export as is, packaged

SRC_ONNX_DIR is an optimum ``text-generation-with-past`` export folder (model.onnx, config.json, tokenizer files);
MODEL_DIR a safetensors checkpoint folder, or with --gguf-file the folder holding that GGUF.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import runs  # noqa: E402
from measure import run as run_measured  # noqa: E402  (this module's own measure() is the comparison)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json")
PROMPT_TEXT = ("The history of computing is a story of people who wanted to calculate faster than they could by "
               "hand. Early machines used gears and levers; later ones used relays, vacuum tubes and transistors. "
               "Each generation made the previous one look slow, and each brought new questions about what a "
               "machine should be asked to do, who should program it, and how its answers could be trusted. ")


# ---------------------------------------------------------------------------------------------------- packaging
def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _genai_config(out_dir: Path, model, hf_config: dict, generation_config: dict | None, context_length: int) -> None:
    """genai_config.json: edgeq.llm.genai's writer where present; GroupQueryAttention graphs share the KV buffer.

    The builder's GQA models run with ``past_present_share_buffer`` on (one max_length buffer per layer that GQA
    writes the new step into); optimum's unfused graph concatenates past and new, so it needs it off.
    """
    has_gqa = any(n.op_type == "GroupQueryAttention" for n in model.graph.node)
    try:
        from edgeq.llm.genai import write_genai_config
    except ImportError:
        write_genai_config = None
    if write_genai_config is not None:
        path = write_genai_config(out_dir, "model.onnx", model, hf_config, generation_config,
                                  context_length=context_length)
        config = json.loads(path.read_text())
    else:  # minimal local writer (same keys as the model builder's)
        inputs = {"input_ids": "input_ids", "attention_mask": "attention_mask"}
        if any(i.name == "position_ids" for i in model.graph.input):
            inputs["position_ids"] = "position_ids"
        inputs |= {"past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"}
        heads = hf_config["num_attention_heads"]
        gen = generation_config or {}
        eos = gen.get("eos_token_id", hf_config.get("eos_token_id"))
        config = {
            "model": {
                "bos_token_id": gen.get("bos_token_id", hf_config.get("bos_token_id")),
                "context_length": context_length,
                "decoder": {
                    "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                    "filename": "model.onnx",
                    "head_size": hf_config.get("head_dim", hf_config["hidden_size"] // heads),
                    "hidden_size": hf_config["hidden_size"],
                    "inputs": inputs,
                    "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                                "present_value_names": "present.%d.value"},
                    "num_attention_heads": heads,
                    "num_hidden_layers": hf_config["num_hidden_layers"],
                    "num_key_value_heads": hf_config.get("num_key_value_heads", heads),
                },
                "eos_token_id": eos,
                "pad_token_id": gen.get("pad_token_id", hf_config.get("pad_token_id", eos)),
                "type": hf_config["model_type"],
                "vocab_size": hf_config["vocab_size"],
            },
            "search": {"do_sample": False, "early_stopping": True, "max_length": context_length, "min_length": 0,
                       "num_beams": 1, "num_return_sequences": 1, "past_present_share_buffer": False,
                       "repetition_penalty": 1.0, "temperature": 1.0, "top_k": 50, "top_p": 1.0},
        }
    config["search"]["past_present_share_buffer"] = has_gqa
    (out_dir / "genai_config.json").write_text(json.dumps(config, indent=4) + "\n")


def _write_package(model, src: Path, out: Path, tokenizer_dir: Path | None, context_length: int | None) -> None:
    import onnx

    out.mkdir(parents=True, exist_ok=True)
    big = model.ByteSize() > 1_900_000_000
    onnx.save(model, str(out / "model.onnx"), save_as_external_data=big, location="model.onnx.data" if big else None)
    tok_dir = tokenizer_dir or src
    for name in TOKENIZER_FILES:
        if (tok_dir / name).is_file():
            shutil.copyfile(tok_dir / name, out / name)
    for name in ("config.json", "generation_config.json"):
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
    hf_config = _read_json(src / "config.json")
    if hf_config is None:
        raise SystemExit(f"error: {src} has no config.json")
    ctx = context_length or min(int(hf_config.get("max_position_embeddings", 4096)), 4096)
    _genai_config(out, model, hf_config, _read_json(src / "generation_config.json"), ctx)


def rtn_int4(model, *, head: str = "int4"):
    """ORT's RTN weight-only int4: block 32, symmetric, accuracy_level 4 (int8 activations in the kernel).

    ``head``: the lm_head MatMul (the one writing ``logits``) as int4 like the rest, ``int8`` (8-bit MatMulNBits,
    same block and accuracy level), or ``fp32`` (left alone). A head that reads ``Transpose(embedding)`` (a tied
    export) is not a constant MatMul and stays FP32 whatever this says; ``build_fused`` unties it first.
    """
    import logging

    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    heads = [n.name for n in model.graph.node if n.op_type == "MatMul" and "logits" in n.output]

    def quantize(m, bits: int, exclude=(), include=None):
        cfg = DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=True, accuracy_level=4, bits=bits,
                                           quant_format=QuantFormat.QOperator, op_types_to_quantize=("MatMul",))
        q = MatMulNBitsQuantizer(m, bits=bits, block_size=32, is_symmetric=True, accuracy_level=4,
                                 nodes_to_exclude=list(exclude), nodes_to_include=include, algo_config=cfg)
        q.process()
        return q.model.model

    model = quantize(model, 4, exclude=heads if head != "int4" else ())
    if head == "int8" and heads:
        model = quantize(model, 8, include=heads)
    return model


def _load_src(src: Path):
    import onnx

    path = src / "model.onnx"
    if not path.is_file():
        raise SystemExit(f"error: {path} not found")
    return onnx.load(str(path))


def build_baseline(src: Path, out: Path, tokenizer_dir: Path | None = None, context_length: int | None = None):
    model = rtn_int4(_load_src(src))
    _write_package(model, src, out, tokenizer_dir, context_length)
    return out


def build_fused(model_dir: Path, out: Path, *, gguf_file: str | None = None, precision: str = "int4",
                head: str = "int4", context_length: int | None = None) -> str:
    """edgeq.decoder's fused FP32 decoder of the checkpoint (a GGUF dequantized a tensor at a time), then ORT's own
    RTN int4 over it (``precision`` int4) or nothing (fp32); the package tokenizer as edgeq writes it."""
    import tempfile

    import onnx

    from edgeq.decoder.gguf_weights import gguf_folder
    from edgeq.decoder.graph import write_fp32_decoder
    from edgeq.decoder.spec import decoder_spec
    from edgeq.decoder.weights import open_safetensors
    from edgeq.llm.tokenizer import write_package_tokenizer

    with tempfile.TemporaryDirectory(prefix="llm-decode-", dir=out.parent) as tmp:
        if gguf_file:
            folder, source = gguf_folder(model_dir / gguf_file, Path(tmp) / "source")
        else:
            folder, source = model_dir, open_safetensors(model_dir)
        hf_config = json.loads((folder / "config.json").read_text())
        spec = decoder_spec(hf_config)
        ctx = context_length or min(spec.max_context, 4096)
        gen = _read_json(folder / "generation_config.json")
        # a tied head gets its own table copy where ORT is to quantize it (its quantizer skips Transpose(table))
        untie = precision == "int4" and head != "fp32"
        fp32 = out if precision == "fp32" else Path(tmp) / "fp32"
        path = write_fp32_decoder(spec, source, fp32, context_length=ctx, untie_head=untie, generation_config=gen)
        if precision == "int4":
            model = rtn_int4(onnx.load(str(path)), head=head)
            out.mkdir(parents=True, exist_ok=True)
            onnx.save(model, str(out / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
            shutil.copyfile(fp32 / "genai_config.json", out / "genai_config.json")
        write_package_tokenizer(folder, out)
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    nbits = sum(n.op_type == "MatMulNBits" for n in graph.node)
    return f"{spec.num_layers} layers built fused in FP32" + (f", {nbits} MatMulNBits after ORT's RTN" if nbits else "")


def build_fp32(src: Path, out: Path, tokenizer_dir: Path | None = None, context_length: int | None = None):
    _write_package(_load_src(src), src, out, tokenizer_dir, context_length)
    return out


# ---------------------------------------------------------------------------------------------------- measuring
def prompt_ids(package: Path, n: int) -> list[int]:
    """``n`` token ids of English text from the package's tokenizer.json (deterministic ids if unavailable)."""
    try:
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(package / "tokenizer.json"))
        ids = tok.encode(PROMPT_TEXT, add_special_tokens=False).ids
        ids = [i for i in ids if i >= 0]
    except Exception:  # noqa: BLE001 - any tokenizer trouble: fall back to fixed ids
        ids = []
    if not ids:
        ids = [(1000 + 37 * k) % 20000 + 100 for k in range(64)]
    return (ids * (n // len(ids) + 1))[:n]


def _worker(package: Path, ids: list[int], new_tokens: int, threads: int) -> dict:
    import onnxruntime_genai as og

    from edgeq.speed import genai_model

    t0 = time.perf_counter()
    model = genai_model(package, threads)
    load_s = time.perf_counter() - t0

    def run(prompt: list[int], n: int):
        params = og.GeneratorParams(model)
        total = len(prompt) + n
        params.set_search_options(do_sample=False, max_length=total, min_length=total)
        gen = og.Generator(model, params)
        t = time.perf_counter()
        gen.append_tokens(prompt)  # runs the prompt through the model
        prefill = time.perf_counter() - t
        steps, out = [], []
        while not gen.is_done():
            t = time.perf_counter()
            gen.generate_next_token()
            steps.append(time.perf_counter() - t)
            out.append(int(gen.get_next_tokens()[0]))
        return prefill, steps, out

    run(ids, 4)  # warm-up at the measured prompt length: first-run allocations and kernel caches
    prefill, steps, out = run(ids, new_tokens)
    # The first generate_next_token picks a token from the prefill's logits; each later one runs one decode step.
    decode_steps = steps[1:] if len(steps) > 1 else steps
    return {
        "load_s": load_s,
        "prefill_s": prefill,
        "prefill_tok_s": len(ids) / prefill,
        "decode_tok_s": len(decode_steps) / sum(decode_steps),
        "decode_ms_median": 1000 * statistics.median(decode_steps),
        "new_tokens": len(out),
        "tokens": out,
    }


def _run_child(package: Path, ids: list[int], new_tokens: int, threads: int, log_dir: Path) -> dict:
    """One run in a fresh process started through bench/measure.py's launcher: its result and its own peak RSS."""
    cmd = [sys.executable, __file__, "--_worker", str(package), "--new-tokens", str(new_tokens),
           "--threads", str(threads), "--_ids", ",".join(map(str, ids))]
    m = run_measured(cmd, log_dir=log_dir, cap_gb=1e9, timeout_s=3600.0, env=os.environ | {"PYTHONUNBUFFERED": "1"})
    if m.status != "ok":
        raise SystemExit(f"error: the benchmark child for {package}: {m.status}\n{m.stderr_tail}")
    return json.loads((log_dir / "stdout.txt").read_text().strip().splitlines()[-1]) | {"peak_rss_mb": m.peak_rss_gb * 1e3}


def _package_size_mb(package: Path) -> float:
    return sum(p.stat().st_size for p in package.iterdir() if p.suffix in (".onnx", ".data")) / 2**20


def measure(packages: list[Path], baseline: Path | None, prompt_tokens: int, new_tokens: int,
            repeats: int, threads: int) -> dict:
    order = ([baseline] if baseline else []) + [p for p in packages if p != baseline]
    names = [str(p) for p in order]
    ids = prompt_ids(order[0], prompt_tokens)
    results: dict[str, list[dict]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory(prefix="llm-decode-runs-") as logs:
        def run_one(r: int, name: str) -> dict[str, float]:
            res = _run_child(Path(name), ids, new_tokens, threads, Path(logs) / f"{len(results[name])}-{r}")
            results[name].append(res | {"round": r})
            print(f"  round {r + 1} {Path(name).name}: decode {res['decode_tok_s']:.1f} tok/s, "
                  f"prefill {res['prefill_tok_s']:.0f} tok/s", file=sys.stderr, flush=True)
            return {"decode_tok_s": res["decode_tok_s"], "prefill_tok_s": res["prefill_tok_s"]}

        values = runs.run_interleaved(names, repeats, run_one)
    rows = []
    reference_tokens = results[names[0]][0]["tokens"]
    for p in order:
        rs = results[str(p)]
        spread = runs.spreads(values[str(p)])
        toks = rs[0]["tokens"]
        agree = next((k for k, (a, b) in enumerate(zip(toks, reference_tokens)) if a != b), min(len(toks),
                                                                                             len(reference_tokens)))
        rows.append({
            "package": str(p), "name": p.name,
            "decode_tok_s": spread["decode_tok_s"].median,
            "decode_spread": spread["decode_tok_s"].to_dict(),
            "decode_tok_s_runs": [round(x["decode_tok_s"], 2) for x in rs],
            "prefill_tok_s": spread["prefill_tok_s"].median,
            "prefill_spread": spread["prefill_tok_s"].to_dict(),
            "prefill_tok_s_runs": [round(x["prefill_tok_s"], 1) for x in rs],
            "peak_rss_mb": max(x["peak_rss_mb"] for x in rs),
            "load_s": statistics.median(x["load_s"] for x in rs),
            "size_mb": _package_size_mb(p),
            "greedy_prefix_agreement_with_first": agree,
            "tokens": toks,
        })
    # Ratios: the median over rounds of the ratio within each round (package and baseline ran in the same round),
    # which cancels slow drift in background load better than a ratio of medians; both are in the JSON. Only rounds
    # where neither run was dropped by the outlier rule pair up.
    for row, p in zip(rows, order):
        for key in ("decode_tok_s", "prefill_tok_s"):
            short = key.split("_")[0]
            if baseline is None:
                row[f"{short}_vs_baseline"] = row[f"{short}_vs_baseline_of_medians"] = None
                continue
            mine, base = _kept_by_round(results[str(p)], key), _kept_by_round(results[names[0]], key)
            paired = [mine[r] / base[r] for r in sorted(mine.keys() & base.keys())]
            row[f"{short}_vs_baseline"] = statistics.median(paired) if paired else None
            row[f"{short}_vs_baseline_runs"] = [round(v, 3) for v in paired]
            row[f"{short}_vs_baseline_of_medians"] = row[key] / rows[0][key]
    return {"prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "repeats": repeats, "threads": threads,
            "outlier_rule": runs.RULE, "baseline": str(baseline) if baseline else None, "cpu_count": os.cpu_count(),
            "rows": rows}


def _kept_by_round(results: list[dict], key: str) -> dict[int, float]:
    """round -> the run's ``key`` for the runs the outlier rule keeps (a rerun round counts as its own round)."""
    values = [x[key] for x in results]
    return {x["round"]: x[key] for x, d in zip(results, runs.dropped(values, runs.is_rate(key))) if not d}


def markdown(result: dict) -> str:
    lines = [f"prompt {result['prompt_tokens']} tokens, {result['new_tokens']} new tokens, "
             f"{result['repeats']} interleaved rounds (one process per run), onnxruntime-genai CPU EP on "
             f"{result['threads']} intra-op threads; {result['outlier_rule']}", "",
             "speeds: median of the kept runs (lowest to highest kept run, runs dropped); ratios: median of "
             "per-round ratios to the baseline run of the same round", "",
             "| package | decode tok/s | vs baseline | prefill tok/s | vs baseline | peak RSS MB | "
             "size MB | greedy tokens = first row |",
             "|---|---|---|---|---|---|---|---|"]

    def cell(value: float, s: dict, fmt: str) -> str:
        return f"{value:{fmt}} ({s['low']:{fmt}} to {s['high']:{fmt}}, {s['dropped']} dropped)"

    for r in result["rows"]:
        ratio = (lambda v: f"{v:.2f}x" if v is not None else "")
        lines.append(f"| {r['name']} | {cell(r['decode_tok_s'], r['decode_spread'], '.1f')} | "
                     f"{ratio(r['decode_vs_baseline'])} | {cell(r['prefill_tok_s'], r['prefill_spread'], '.0f')} | "
                     f"{ratio(r['prefill_vs_baseline'])} | {r['peak_rss_mb']:.0f} | "
                     f"{r['size_mb']:.0f} | {r['greedy_prefix_agreement_with_first']}/{len(r['tokens'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--package", action="append", type=Path, default=[], help="package folder (repeatable)")
    ap.add_argument("--baseline", type=Path, help="baseline package; ratios are against it")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, help="intra-op threads (default: the CPUs this process may use)")
    ap.add_argument("--json", type=Path, default=Path("llm_decode.json"), help="where to write the results")
    ap.add_argument("--build-baseline", nargs=2, type=Path, metavar=("SRC_ONNX_DIR", "OUT_DIR"))
    ap.add_argument("--build-fused", nargs=2, type=Path, metavar=("MODEL_DIR", "OUT_DIR"))
    ap.add_argument("--gguf-file", help="for --build-fused: the GGUF in MODEL_DIR to read")
    ap.add_argument("--build-fp32", nargs=2, type=Path, metavar=("SRC_ONNX_DIR", "OUT_DIR"))
    ap.add_argument("--precision", choices=("int4", "fp32"), default="int4", help="for --build-fused")
    ap.add_argument("--head", choices=("int4", "int8", "fp32"), default="int4",
                    help="lm_head precision for --build-fused")
    ap.add_argument("--tokenizer-dir", type=Path, help="tokenizer files (default: SRC_ONNX_DIR; not --build-fused)")
    ap.add_argument("--context-length", type=int, help="genai context_length (default min(max positions, 4096))")
    ap.add_argument("--_worker", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--_ids", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    from edgeq.speed import default_threads

    threads = args.threads or default_threads()
    if args._worker:
        print(json.dumps(_worker(args._worker, [int(x) for x in args._ids.split(",")], args.new_tokens, threads)))
        return 0
    built = False
    for flag, fn in (("build_baseline", build_baseline), ("build_fp32", build_fp32)):
        if getattr(args, flag):
            src, out = getattr(args, flag)
            t = time.time()
            fn(src, out, args.tokenizer_dir, args.context_length)
            print(f"wrote {out} ({time.time() - t:.0f} s)")
            built = True
    if args.build_fused:
        src, out = args.build_fused
        t = time.time()
        summary = build_fused(src, out, gguf_file=args.gguf_file, precision=args.precision, head=args.head,
                              context_length=args.context_length)
        print(f"{summary}\nwrote {out} ({time.time() - t:.0f} s)")
        built = True
    if not args.package and not args.baseline:
        if built:
            return 0
        ap.error("pass --package DIR (and --baseline DIR), or a --build-* mode")
    for p in args.package + ([args.baseline] if args.baseline else []):
        if not (p / "genai_config.json").is_file():
            ap.error(f"{p} has no genai_config.json (not an onnxruntime-genai package)")
    result = measure(args.package, args.baseline, args.prompt_tokens, args.new_tokens, args.repeats, threads)
    table = markdown(result)
    print(table)
    result["markdown"] = table
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
