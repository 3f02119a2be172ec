"""Where an encoder package's time goes on this CPU, and what its sensitive layers' precision trades.

    python bench/encoder_speed.py BUILD_DIR [--sentences 96] [--arm64-texts 16] [--out FILE.md]

BUILD_DIR is the build folder a `make bench` run leaves (bench/results/<model>/build): fp32/model.onnx, the edgeq
package under edgeq/ and the peer variants. The script exports the model twice more with the bench profile changed
only in the sensitive layers' precision: ``quantization.sensitive_precision = "int8-weight-only"`` (the profiles'
choice before per-token layers) with ``package.matmulnbits_accuracy_level`` 0 and 4. Then for FP32, edgeq as
bundled (int8-per-token), the two weight-only packages and ORT's per-channel dynamic INT8 it prints

* the median ms per sentence at batch 1 (edgeq/speed.py, as the bench measures it, every model on the same
  intra-op thread count), in rounds interleaved so that other work on the machine touches every model alike, with
  the range of the runs and the bench's outlier rule (bench/runs.py). The edgeq packages differ in nothing but the
  promoted layers (and how many the search promoted), so their differences are those layers' cost. (ONNX
  Runtime's profiler is no help here: with profiling on, a level-0 package ran 15 ms instead of 5.8.)
* each package's accuracy against FP32 on the held-back texts (its manifest);
* with ``--arm64-texts N``, how far each edgeq package's outputs on emulated arm64 are from x86's and from FP32 on N
  texts (bench/arm64_agreement.py): reported, while the device check gates against FP32 on the device.

Why it exists: the bench measured edgeq's MiniLM package slower at batch 1 than FP32 on x86 when its promoted layers
were weight-only (BENCHMARKS.md, "Encoder speed on x86").
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
BUNDLED = "edgeq as bundled (sensitive layers int8-per-token)"
WEIGHT_ONLY = {  # name -> the profile lines changed
    "edgeq, sensitive layers int8-weight-only, accuracy_level 0": {
        "sensitive_precision": '"int8-weight-only"', "matmulnbits_accuracy_level": "0"},
    "edgeq, sensitive layers int8-weight-only, accuracy_level 4": {
        "sensitive_precision": '"int8-weight-only"', "matmulnbits_accuracy_level": "4"},
}


def export_with(build: Path, lines: dict[str, str], work: Path, name: str) -> Path:
    """The bench's edgeq package again, with only the profile lines ``key = value`` in ``lines`` changed."""
    from edgeq.manifest import read_manifest
    from edgeq.pipeline import ExportRequest, export_package
    from edgeq.progress import Progress

    text = (build / "bench-profile.toml").read_text()
    for key, value in lines.items():
        text, n = re.subn(rf"(?m)^{re.escape(key)} = .*$", f"{key} = {value}", text)
        if n != 1:
            raise SystemExit(f"{build / 'bench-profile.toml'} has no single '{key} = ' line")
    profile = work / f"{name}.toml"
    profile.write_text(text)
    source = read_manifest(bundled_package(build)).source
    # manifests name the source by file hashes, not by path (older ones had it); the bench's bench.json has the path
    model = source.path or json.loads((build.parent / "bench.json").read_text())["model"]
    pkg = export_package(ExportRequest(Path(model), str(profile), out_dir=work / name, force=True), Progress())
    return pkg.path


def median_ms(models: dict[str, Path], tokenizer, texts: list[str], seq_len: int,
              threads: int) -> dict[str, runs.Spread]:
    from edgeq.speed import encoder_ms_per_sentence

    def run_one(_: int, name: str) -> dict[str, float]:
        return {"ms_per_sentence": encoder_ms_per_sentence(models[name], tokenizer, texts, seq_len, threads=threads)}

    return {name: runs.summarize(v["ms_per_sentence"], rate=False)
            for name, v in runs.run_interleaved(list(models), ROUNDS, run_one).items()}


def bundled_package(build: Path) -> Path:
    """The edgeq package of a make bench build folder (the bundled profile)."""
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
    work = Path(tempfile.mkdtemp(prefix="encoder-speed-", dir=build))
    packages = {BUNDLED: bundled_package(build)}
    packages.update({name: export_with(build, lines, work, f"variant{i}")
                     for i, (name, lines) in enumerate(WEIGHT_ONLY.items())})
    models = {"FP32": build / "fp32" / "model.onnx", **{name: pkg / "model.ort" for name, pkg in packages.items()},
              "ORT dynamic INT8 per-channel": build / "ort-dynamic-int8" / "model_quantized.onnx"}
    manifests = {name: read_manifest(pkg) for name, pkg in packages.items()}
    seq_len = manifests[BUNDLED].profile.values.accuracy.eval_seq_len
    tokenizer = AutoTokenizer.from_pretrained(str(build / "fp32"))
    texts = list(load_texts(EVALUATION_FILE).head(args.sentences))
    threads = args.threads or default_threads()
    spread = median_ms(models, tokenizer, texts, seq_len, threads)
    ms = {name: s.median for name, s in spread.items()}

    arm = f" --arm64-texts {args.arm64_texts}" if args.arm64_texts else ""
    lines = [f"Batch 1, {len(texts)} texts of {EVALUATION_FILE.name}, {ROUNDS} interleaved rounds on {threads} "
             f"intra-op threads ({runs.RULE}), {datetime.date.today()}, load average {os.getloadavg()[0]:.2f} at the "
             f"end (`python bench/encoder_speed.py bench/results/<model>/build{arm}` after `make bench`). Accuracy: "
             "against FP32 on the held-back texts, from each package's manifest.", "",
             "| model | size MB | ms/sentence: median (lowest to highest kept run, dropped) | vs FP32 | promoted "
             "| mean / min cosine | retrieval top-1 |", "|---|---|---|---|---|---|---|"]
    for name, path in models.items():
        s = spread[name]
        m = manifests.get(name)
        acc = f"{m.accuracy.mean_cosine:.5f} / {m.accuracy.min_cosine:.5f} | {m.accuracy.retrieval_top1:.3f}" if m \
            else "— | —"
        promoted = m.precision.promoted_sensitive_layers if m else "—"
        lines.append(f"| {name} | {path.stat().st_size / 1e6:.1f} | {s.median:.2f} ({s.low:.2f} to {s.high:.2f}, "
                     f"{s.dropped} dropped) | {ms['FP32'] / ms[name]:.2f}x | {promoted} | {acc} |")
    if args.arm64_texts:
        from arm64_agreement import agreement

        from edgeq.stages.verify import DEVICE_DEFAULTS

        stated = manifests[BUNDLED].verification.device_min_cosine
        lines += ["", f"arm64 (PyPI's aarch64 ONNX Runtime under qemu) vs x86, {args.arm64_texts} texts, per-text "
                      f"cosine of pooled outputs (profile package.device_min_cosine "
                      f"{DEVICE_DEFAULTS['device_min_cosine'] if stated is None else stated}, reported):", ""]
        for name, pkg in packages.items():
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
