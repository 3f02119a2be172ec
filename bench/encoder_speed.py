"""Where an encoder package's time goes on this CPU, and what its weight-only layers' accuracy_level trades.

    python bench/encoder_speed.py BUILD_DIR [--sentences 96] [--arm64-texts 16] [--out FILE.md]

BUILD_DIR is the build folder a `make bench` run leaves (bench/results/<model>/build): fp32/model.onnx, the edgeq
package under edgeq/ and the peer variants. The script exports the model once more with the bench profile changed
only in ``package.matmulnbits_accuracy_level = 4``, then for FP32, edgeq as bundled (level 0), edgeq at level 4 and
ORT's per-channel dynamic INT8 prints

* the median ms per sentence at batch 1 (edgeq/speed.py, as the bench measures it, every model on the same
  intra-op thread count), in rounds interleaved so that other work on the machine touches every model alike, with
  the range of the runs and the bench's outlier rule (bench/runs.py). The two edgeq packages differ in nothing but the weight-only
  layers' accuracy_level, so their difference is those layers' cost. (ONNX Runtime's profiler is no help here: with
  profiling on, the level-0 package ran 15 ms instead of 5.8.)
* with ``--arm64-texts N``, how far each edgeq package's outputs on emulated arm64 are from x86's on N texts
  (bench/arm64_agreement.py): the reason the bundled profiles choose level 0, against profile
  ``package.device_min_cosine``.

Why it exists: the bench measured edgeq's MiniLM package slower at batch 1 than FP32 on x86 (BENCHMARKS.md, "Encoder
speed on x86").
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import runs  # noqa: E402

ROUNDS = 3
LEVEL0 = "edgeq, weight-only layers at accuracy_level 0 (bundled)"
LEVEL4 = "edgeq, weight-only layers at accuracy_level 4"


def export_at_level(build: Path, level: int, work: Path) -> Path:
    """The bench's edgeq package again, with only package.matmulnbits_accuracy_level changed."""
    from edgeq.manifest import read_manifest
    from edgeq.pipeline import ExportRequest, export_package
    from edgeq.progress import Progress

    text, n = re.subn(r"(?m)^matmulnbits_accuracy_level = \d", f"matmulnbits_accuracy_level = {level}",
                      (build / "bench-profile.toml").read_text())
    if n != 1:
        raise SystemExit(f"{build / 'bench-profile.toml'} has no single 'matmulnbits_accuracy_level = ' line")
    profile = work / f"level{level}.toml"
    profile.write_text(text)
    source = read_manifest(bundled_package(build)).source
    # manifests name the source by file hashes, not by path (older ones had it); the bench's bench.json has the path
    model = source.path or json.loads((build.parent / "bench.json").read_text())["model"]
    pkg = export_package(ExportRequest(Path(model), str(profile), out_dir=work / f"level{level}", force=True),
                         Progress())
    return pkg.path


def median_ms(models: dict[str, Path], tokenizer, texts: list[str], seq_len: int,
              threads: int) -> dict[str, runs.Spread]:
    from edgeq.speed import encoder_ms_per_sentence

    def run_one(_: int, name: str) -> dict[str, float]:
        return {"ms_per_sentence": encoder_ms_per_sentence(models[name], tokenizer, texts, seq_len, threads=threads)}

    return {name: runs.summarize(v["ms_per_sentence"], rate=False)
            for name, v in runs.run_interleaved(list(models), ROUNDS, run_one).items()}


def bundled_package(build: Path) -> Path:
    """The edgeq package of a make bench build folder (bundled profile, level 0)."""
    return next(p.parent for p in (build / "edgeq").glob("*/manifest.json"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("build", type=Path, help="a make bench build folder: bench/results/<model>/build")
    ap.add_argument("--sentences", type=int, default=96)
    ap.add_argument("--arm64-texts", type=int, default=0, help="also measure arm64-vs-x86 agreement on N texts")
    ap.add_argument("--out", type=Path, help="also write the Markdown here")
    ap.add_argument("--threads", type=int, help="intra-op threads (default: the CPUs this process may use)")
    args = ap.parse_args(argv)

    from transformers import AutoTokenizer

    from edgeq.manifest import read_manifest
    from edgeq.speed import default_threads
    from edgeq.textdata import EVALUATION_FILE, load_texts

    build = args.build.resolve()
    bundled = bundled_package(build)
    work = Path(tempfile.mkdtemp(prefix="encoder-speed-", dir=build))
    level4 = export_at_level(build, 4, work)
    models = {"FP32": build / "fp32" / "model.onnx",
              LEVEL0: bundled / "model.ort",
              LEVEL4: level4 / "model.ort",
              "ORT dynamic INT8 per-channel": build / "ort-dynamic-int8" / "model_quantized.onnx"}
    manifest = read_manifest(bundled)
    seq_len = manifest.profile.values.accuracy.eval_seq_len
    tokenizer = AutoTokenizer.from_pretrained(str(build / "fp32"))
    texts = list(load_texts(EVALUATION_FILE).head(args.sentences))
    threads = args.threads or default_threads()
    spread = median_ms(models, tokenizer, texts, seq_len, threads)
    ms = {name: s.median for name, s in spread.items()}
    layers = sum(n.precision == "int8-weight-only" for n in manifest.precision.nodes)

    arm = f" --arm64-texts {args.arm64_texts}" if args.arm64_texts else ""
    lines = [f"Batch 1, {len(texts)} texts of {EVALUATION_FILE.name}, {ROUNDS} interleaved rounds on {threads} "
             f"intra-op threads ({runs.RULE}), {datetime.date.today()}, load average {os.getloadavg()[0]:.2f} at the "
             f"end (`python bench/encoder_speed.py bench/results/<model>/build{arm}` after `make bench`).", "",
             "| model | size MB | ms/sentence: median (lowest to highest kept run, dropped) | vs FP32 |",
             "|---|---|---|---|"]
    for name, path in models.items():
        s = spread[name]
        lines.append(f"| {name} | {path.stat().st_size / 1e6:.1f} | {s.median:.2f} ({s.low:.2f} to {s.high:.2f}, "
                     f"{s.dropped} dropped) | {ms['FP32'] / ms[name]:.2f}x |")
    ms0, ms4 = ms[LEVEL0], ms[LEVEL4]
    lines += ["", f"The {layers} weight-only layers cost {(ms0 - ms4) / layers * 1000:.0f} µs more per call at "
                  f"level 0 than at level 4 ({ms0 - ms4:.2f} ms per sentence). Accuracy against FP32 on "
                  "the held-back texts (the packages' manifests): " + "; ".join(
                      f"level {lv} mean cosine {a.mean_cosine:.5f}, min {a.min_cosine:.5f}, retrieval top-1 "
                      f"{a.retrieval_top1:.3f}" for lv, a in ((0, manifest.accuracy),
                                                              (4, read_manifest(level4).accuracy))) + "."]
    if args.arm64_texts:
        from arm64_agreement import agreement

        from edgeq.stages.verify import DEVICE_DEFAULTS

        stated = manifest.verification.device_min_cosine
        lines += ["", f"arm64 (PyPI's aarch64 ONNX Runtime under qemu) vs x86, {args.arm64_texts} texts, per-text "
                      f"cosine of pooled outputs (profile package.device_min_cosine "
                      f"{DEVICE_DEFAULTS['device_min_cosine'] if stated is None else stated}):", ""]
        for name, pkg in (("level 0 (bundled)", bundled), ("level 4", level4)):
            a = agreement(pkg, args.arm64_texts, models["FP32"])
            h, r = a["host_vs_reference"], a["arm64_vs_reference"]
            lines.append(f"- {name}: min cosine {a['min_cosine']:.5f}, mean {a['mean_cosine']:.5f}; against FP32 on the "
                         f"same texts x86 min {h['min_cosine']:.5f} / mean {h['mean_cosine']:.5f}, arm64 min "
                         f"{r['min_cosine']:.5f} / mean {r['mean_cosine']:.5f}")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
