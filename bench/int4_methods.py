"""Benchmark: INT4 weight-only methods on a causal LM, against its FP32 ONNX export, in one run.

    .venv/bin/python bench/int4_methods.py [--onnx /tmp/llm/onnx-fp32/model.onnx] [--tokenizer /tmp/llm/smollm2]
                                           [--windows 16] [--only SUBSTRING ...] [--json out.json]

Rows: ONNX Runtime's MatMulNBitsQuantizer RTN (block 32, symmetric, accuracy_level 4: onnxruntime-genai's builder
default for CPU), then edgeq's methods at symmetric block 32, asymmetric block 32, symmetric 64 and 128, all at
accuracy_level 4 (A quantized to int8 per block inside the kernel, as phones run it):

  rtn              round to nearest, no statistics (the same bytes as ORT's RTN)
  rtn+clip         per-block clip ratio minimizing diag(H)-weighted error
  rtn+clip+refit+int8  ... then block scales refit by least squares under H, and 8 bits for the K/V projections
                   and the layers whose INT4 relative output error is above 2x the median
  gptq+clip        GPTQ with the calibration Hessian and the clip search, all layers INT4
  gptq+clip+int8   ... and the 8-bit layers as above (int4_pass's defaults)
  gptq+clip+int8 (1.25x)  promotion threshold 1.25x the median instead of 2x (more layers at 8 bits)

Calibration: 8 x 512 tokens of calibration_data/calibration.jsonl; evaluation: up to 16 x 512 tokens of
evaluation.jsonl (held back). The lm_head (tied to the embedding) stays FP32 in every row, ORT's included (its
quantizer skips a MatMul whose weight is not an initializer). Size is the whole .onnx; "linear MB" is the
MatMulNBits initializers alone (FP32 linear layers: 425 MB).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import onnx
from transformers import AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgeq.llm.activations import collect_activation_stats  # noqa: E402
from edgeq.llm.evaluate import (CALIBRATION_WINDOWS, EVALUATION_WINDOWS, WINDOW, ReferenceLogits,  # noqa: E402
                                evaluate_lm, token_windows)
from edgeq.llm.int4 import int4_pass  # noqa: E402
from edgeq.progress import Progress  # noqa: E402
from edgeq.textdata import CALIBRATION_FILE, EVALUATION_FILE, load_texts  # noqa: E402

SETTINGS = {"sym b32": (32, True), "asym b32": (32, False), "sym b64": (64, True), "sym b128": (128, True)}
METHODS = {  # every option spelled out, so a row does not move when a default does
    "rtn": dict(method="rtn", clip=False, refit=False, int8_kv=False, promote=None),
    "rtn+clip": dict(method="rtn", clip=True, refit=False, int8_kv=False, promote=None),
    "rtn+clip+refit+int8": dict(method="rtn", clip=True, refit=True, int8_kv=True, promote=2.0),
    "gptq+clip": dict(method="gptq", clip=True, refit=False, int8_kv=False, promote=None),
    "gptq+clip+int8": dict(method="gptq", clip=True, refit=False, int8_kv=True, promote=2.0),
}
EXTRA = {  # (setting, label) -> options: candidates for the default with more layers at 8 bits
    ("asym b32", "gptq+clip+int8 (1.25x)"): dict(method="gptq", clip=True, refit=False, int8_kv=True, promote=1.25),
    ("sym b32", "gptq+clip+int8 (1.25x)"): dict(method="gptq", clip=True, refit=False, int8_kv=True, promote=1.25),
}


def linear_mb(model: onnx.ModelProto) -> float:
    names = {i for n in model.graph.node if n.op_type == "MatMulNBits" for i in n.input[1:]}
    return sum(len(i.raw_data) for i in model.graph.initializer if i.name in names) / 1e6


def ort_rtn(model: onnx.ModelProto) -> onnx.ModelProto:
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)  # it logs every node at INFO

    work = onnx.ModelProto()
    work.CopyFrom(model)
    cfg = DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=True, accuracy_level=4)
    q = MatMulNBitsQuantizer(work, algo_config=cfg)
    q.process()
    return q.model.model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--onnx", default="/tmp/llm/onnx-fp32/model.onnx")
    ap.add_argument("--tokenizer", default="/tmp/llm/smollm2")
    ap.add_argument("--windows", type=int, default=EVALUATION_WINDOWS)
    ap.add_argument("--only", nargs="*", help="run only rows whose label contains one of these")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = ap.parse_args()
    progress = Progress()
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    calib = token_windows(tok, load_texts(CALIBRATION_FILE).texts, WINDOW, CALIBRATION_WINDOWS)
    evalw = token_windows(tok, load_texts(EVALUATION_FILE).texts, WINDOW, args.windows)
    model = onnx.load(args.onnx)
    rows = []

    def record(label: str, qmodel: onnx.ModelProto, seconds: float, ref: ReferenceLogits, extra: str = "") -> None:
        t = time.monotonic()
        acc = evaluate_lm(qmodel, ref, evalw)
        row = dict(label=label, ppl=acc.perplexity, ppl_increase=acc.ppl_increase, kl=acc.mean_kl,
                   top1=acc.top1_agreement, size_mb=qmodel.ByteSize() / 1e6, linear_mb=linear_mb(qmodel),
                   quant_s=seconds, eval_s=time.monotonic() - t, note=extra)
        rows.append(row)
        progress.stage(label, f"ppl {acc.perplexity:.2f} ({100 * acc.ppl_increase:+.1f}%), KL {acc.mean_kl:.4f}, "
                              f"top-1 {acc.top1_agreement:.3f}, {row['size_mb']:.1f} MB, quantized in {seconds:.0f} s")

    def wanted(label: str) -> bool:
        return not args.only or any(o in label for o in args.only)

    progress.stage("reference", f"FP32 log-probs of {len(evalw)} x {WINDOW} tokens")
    with ReferenceLogits(model, evalw, progress=progress) as ref:
        record("FP32", model, 0.0, ref)
        if wanted("ORT"):
            t = time.monotonic()
            q = ort_rtn(model)
            record("ORT MatMulNBitsQuantizer RTN sym b32", q, time.monotonic() - t, ref)
            del q
        t = time.monotonic()
        stats = collect_activation_stats(model, calib, progress=progress)
        stats_s = time.monotonic() - t
        progress.stage("activation statistics", f"{len(stats.inputs)} inputs, {stats_s:.0f} s")
        runs = [(s, name, kw) for s in SETTINGS for name, kw in METHODS.items()]
        runs += [(s, name, kw) for (s, name), kw in EXTRA.items()]
        for setting, name, kw in runs:
            block, symmetric = SETTINGS[setting]
            label = f"edgeq {name} {setting}"
            if not wanted(label):
                continue
            t = time.monotonic()  # measuring and deciding (sensitivities) counted with quantizing, as before
            result = int4_pass(model, stats, block_size=block, symmetric=symmetric, accuracy_level=4, **kw)(model)
            int8 = sum(d.bits == 8 for d in result.decisions)
            record(label, result.model, time.monotonic() - t, ref, f"{int8} layers INT8" if int8 else "")
            del result
    print(f"\nactivation statistics: {stats_s:.0f} s for {len(calib)} x {WINDOW} tokens (shared by every edgeq row)")
    print(f"evaluation: {len(evalw)} x {WINDOW} tokens, {rows[0]['ppl']:.2f} FP32 perplexity\n")
    print("| model | ppl | ppl increase | KL | top-1 | size MB | linear MB | quantize s | note |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['label']} | {r['ppl']:.2f} | {100 * r['ppl_increase']:+.1f}% | {r['kl']:.4f} | {r['top1']:.3f} | "
              f"{r['size_mb']:.1f} | {r['linear_mb']:.1f} | {r['quant_s']:.0f} | {r['note']} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
