"""Benchmark: INT4 weight-only methods on a causal LM, against its FP32 forward, in one run.

    .venv/bin/python bench/int4_methods.py --model DIR [--gguf-file NAME] [--windows 16] [--only SUBSTRING ...]
                                           [--json out.json] [--work DIR]

Rows: ONNX Runtime's MatMulNBitsQuantizer RTN (block 32, symmetric, accuracy_level 4: onnxruntime-genai's builder
default for CPU) over edgeq.decoder's fused FP32 graph of the checkpoint (the fused-RTN peer), then edgeq's methods
at symmetric block 32, asymmetric block 32, symmetric 64 and 128, each quantized layer by layer as the export does
(edgeq.decoder.layerwise), all at accuracy_level 4 (A quantized to int8 per block inside the kernel, as phones run
it):

  rtn              round to nearest, no statistics (the same bytes as ORT's RTN)
  rtn+clip         per-block clip ratio minimizing diag(H)-weighted error
  rtn+clip+refit+int8  ... then block scales refit by least squares under H, and 8 bits for the K/V projections
                   and the layers whose INT4 relative output error is above 2x the median
  gptq+clip        GPTQ with the calibration Hessian and the clip search, all layers INT4
  gptq+clip+int8   ... and the 8-bit layers as above (the policy's defaults)
  gptq+clip+int8 (1.25x)  promotion threshold 1.25x the median instead of 2x (more layers at 8 bits)

Calibration: 8 x 512 tokens of calibration_data/calibration.jsonl; evaluation: up to 16 x 512 tokens of
evaluation.jsonl (held back), against the FP32 log-probabilities edgeq.decoder.layerwise.measure computes layer by
layer. The embedding table stays FP32 in every row; a tied lm_head stays on it, ORT's row included (its quantizer
skips a MatMul whose weight is not an initializer). Size is model.onnx + model.onnx.data; "linear MB" is the
MatMulNBits initializers alone. "quantize s" is deciding, quantizing and writing; the measurement each block setting
needs (Hessians, sensitivities) is timed apart. The cheapest run: --only ORT "edgeq rtn sym b32" --windows 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edgeq.decoder.gguf_weights import gguf_folder  # noqa: E402
from edgeq.decoder.graph import (embed, embedding_table, final_norm_weight, write_decoder,  # noqa: E402
                                 write_fp32_decoder)
from edgeq.decoder.layerwise import Measured, QuantSettings, measure, quantized_head, quantized_layers  # noqa: E402
from edgeq.decoder.spec import decoder_spec  # noqa: E402
from edgeq.decoder.weights import open_safetensors  # noqa: E402
from edgeq.llm.evaluate import (CALIBRATION_WINDOWS, EVALUATION_WINDOWS, WINDOW, ReferenceLogits,  # noqa: E402
                                evaluate_lm, token_windows)
from edgeq.policy import Int4Rules, decide_int4, int4_setting  # noqa: E402
from edgeq.progress import Progress  # noqa: E402
from edgeq.safe_load import load_tokenizer  # noqa: E402
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


def stored_mb(model_path: Path) -> tuple[float, float]:
    """(model.onnx + its external data, the MatMulNBits initializers alone) in MB, read from the graph's records."""
    graph = onnx.load(str(model_path), load_external_data=False).graph
    nbits = {i for n in graph.node if n.op_type == "MatMulNBits" for i in n.input[1:]}

    def size(t: onnx.TensorProto) -> int:
        return next((int(e.value) for e in t.external_data if e.key == "length"), len(t.raw_data))

    total = sum(p.stat().st_size for p in model_path.parent.glob("model.onnx*"))
    return total / 1e6, sum(size(t) for t in graph.initializer if t.name in nbits) / 1e6


def ort_rtn(fp32: Path, out: Path) -> Path:
    """ORT's MatMulNBitsQuantizer RTN over the fused FP32 decoder (every MatMul on an initializer)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)  # it logs every node at INFO
    cfg = DefaultWeightOnlyQuantConfig(block_size=32, is_symmetric=True, accuracy_level=4)
    q = MatMulNBitsQuantizer(onnx.load(str(fp32)), algo_config=cfg)
    q.process()
    out.mkdir(parents=True, exist_ok=True)
    onnx.save(q.model.model, str(out / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    return out / "model.onnx"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="safetensors checkpoint folder, or the GGUF's folder")
    ap.add_argument("--gguf-file", help="the GGUF in --model to read (dequantized a tensor at a time)")
    ap.add_argument("--windows", type=int, default=EVALUATION_WINDOWS)
    ap.add_argument("--only", nargs="*", help="run only rows whose label contains one of these")
    ap.add_argument("--json", type=Path, help="also write the rows as JSON")
    ap.add_argument("--work", type=Path, help="keep the packages here (default: a temporary folder)")
    args = ap.parse_args()
    progress = Progress()
    with tempfile.TemporaryDirectory(prefix="int4-methods-") as tmp:
        run(args, args.work or Path(tmp), progress)


def run(args: argparse.Namespace, work: Path, progress: Progress) -> None:
    if args.gguf_file:
        folder, source = gguf_folder(args.model / args.gguf_file, work / "source")
    else:
        folder, source = args.model, open_safetensors(args.model)
    spec = decoder_spec(json.loads((folder / "config.json").read_text()))
    tok = load_tokenizer(folder)
    calib = token_windows(tok, load_texts(CALIBRATION_FILE).texts, WINDOW, CALIBRATION_WINDOWS)
    evalw = token_windows(tok, load_texts(EVALUATION_FILE).texts, WINDOW, args.windows)
    rows, measured, measure_s = [], {}, {}

    def wanted(label: str) -> bool:
        return not args.only or any(o in label for o in args.only)

    runs = [(s, name, kw) for s in SETTINGS for name, kw in METHODS.items()]
    runs += [(s, name, kw) for (s, name), kw in EXTRA.items()]
    runs = [(s, name, kw) for s, name, kw in runs if wanted(f"edgeq {name} {s}")]

    def measured_for(setting: str) -> Measured:
        """Pass 1 for one block setting (sensitivities where a row of it promotes), run once."""
        if setting not in measured:
            block, symmetric = SETTINGS[setting]
            sens = any(s == setting and kw["promote"] is not None for s, _, kw in runs)
            t = time.monotonic()
            measured[setting] = measure(spec, source, calib, evalw, context_length=WINDOW, block_size=block,
                                        symmetric=symmetric, sensitivities=sens,
                                        reference_dir=work / f"ref-{setting.replace(' ', '-')}", progress=progress)
            measure_s[setting] = time.monotonic() - t
        return measured[setting]

    def record(label: str, path: Path, seconds: float, ref: ReferenceLogits, extra: str = "") -> None:
        t = time.monotonic()
        acc = evaluate_lm(path, ref, evalw)
        size, linear = stored_mb(path)
        row = dict(label=label, ppl=acc.perplexity, ppl_increase=acc.ppl_increase, kl=acc.mean_kl,
                   top1=acc.top1_agreement, size_mb=size, linear_mb=linear, quant_s=seconds,
                   eval_s=time.monotonic() - t, note=extra)
        rows.append(row)
        progress.stage(label, f"ppl {acc.perplexity:.2f} ({100 * acc.ppl_increase:+.1f}%), KL {acc.mean_kl:.4f}, "
                              f"top-1 {acc.top1_agreement:.3f}, {size:.1f} MB, quantized in {seconds:.0f} s")

    progress.stage("reference", f"FP32 log-probs of {len(evalw)} x {WINDOW} tokens, layer by layer")
    ref = measured_for(runs[0][0] if runs else "sym b32").reference
    fp32 = write_fp32_decoder(spec, source, work / "fp32", context_length=WINDOW)
    record("FP32 (edgeq.decoder, fused)", fp32, 0.0, ref)
    if wanted("ORT"):
        t = time.monotonic()
        q = ort_rtn(fp32, work / "ort-rtn")
        record("ORT MatMulNBitsQuantizer RTN sym b32 (fused FP32 graph)", q, time.monotonic() - t, ref)
    for setting, name, kw in runs:
        block, symmetric = SETTINGS[setting]
        label = f"edgeq {name} {setting}"
        m = measured_for(setting)
        t = time.monotonic()
        rules = Int4Rules(setting=int4_setting(kw["method"], kw["clip"], kw["refit"], True, block, symmetric, 4),
                          block_size=block, symmetric=symmetric, int8_kv=kw["int8_kv"], promote=kw["promote"])
        plan = {d.node: d for d in decide_int4(m.facts, rules)}
        settings = QuantSettings(kw["method"], block, symmetric, 4, clip=kw["clip"], refit=kw["refit"])
        table = embedding_table(source)
        layers = quantized_layers(spec, source, embed(spec, table, calib), plan, settings, context_length=WINDOW,
                                  progress=progress)
        out = work / label.replace(" ", "_")
        path = write_decoder(spec, out, table, layers, final_norm_weight(spec, source),
                             quantized_head(spec, source, m, plan, settings), context_length=WINDOW)
        del table
        int8 = sum(d.bits == 8 for d in plan.values())
        record(label, path, time.monotonic() - t, ref, f"{int8} layers INT8" if int8 else "")
    for m in measured.values():
        m.reference.close()
    print("\nmeasurement (FP32 forward, Hessians, sensitivities) per block setting: "
          + ", ".join(f"{s} {v:.0f} s" for s, v in measure_s.items()) + f", {len(calib)} x {WINDOW} tokens")
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
