"""How far an encoder package's outputs on emulated arm64 are from x86's, text by text (issue 4's measurements).

    python bench/arm64_agreement.py PACKAGE [--texts 32] [--json OUT.json]

Runs the package's model on the host's ONNX Runtime and on PyPI's aarch64 ONNX Runtime under qemu (edgeq/devices/
arm64.py) for the first N texts of the bundled evaluation split (the first 4 are the package's stored verification
samples), pools as the package does, and prints per-text cosine, how many texts agree to float rounding (no int8
activation flipped), and the largest |diff| / max |ref|. ``--taps MODEL.onnx --text I`` instead lists, node by node, how many uint8 activations differ
between the two CPUs for text I (which float op first differs, and how one int8 flip grows over the layers); give it
an ONNX model that ONNX Runtime already optimized (the fused MatMulNBits carry their accuracy_level).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def agreement(package: Path, n: int, reference: Path | None = None) -> dict:
    """arm64 against x86 for the package's model; with ``reference`` (the FP32 ONNX model), each of the two against
    it as well: ``host_vs_reference`` and ``arm64_vs_reference`` (min and mean cosine), what a user on each CPU gets."""
    from transformers import AutoTokenizer

    from edgeq.devices.arm64 import ensure_runtime, run_on_arm64
    from edgeq.manifest import read_manifest
    from edgeq.metrics import per_sample_cosine
    from edgeq.runtime import encode, pool, session
    from edgeq.textdata import EVALUATION_FILE, load_texts

    m = read_manifest(package)
    model = package / m.model.file
    sess = session(model)
    feeds = encode(AutoTokenizer.from_pretrained(str(package)), load_texts(EVALUATION_FILE).head(n),
                   m.profile.values.accuracy.eval_seq_len, [i.name for i in sess.get_inputs()])
    pooling = m.verification.pooling
    host = pool(sess.run(None, feeds)[0], feeds["attention_mask"], pooling)
    arm = pool(run_on_arm64(ensure_runtime(), model, feeds).outputs[0], feeds["attention_mask"], pooling)
    cos = per_sample_cosine(host, arm)
    # "agree": equal up to float rounding (no int8 activation flipped): per text max |diff| <= 1e-5 of max |ref|
    per_text = np.abs(host - arm).max(axis=1) / np.abs(host).max(axis=1)
    out = {"package": str(package), "texts": n, "agree": int((per_text <= 1e-5).sum()),
           "min_cosine": float(cos.min()), "mean_cosine": float(cos.mean()),
           "max_rel_diff": float(np.abs(host - arm).max() / np.abs(host).max()),
           "per_text_cosine": [round(float(c), 6) for c in cos]}
    if reference is not None:
        ref = pool(session(reference).run(None, feeds)[0], feeds["attention_mask"], pooling)
        for name, emb in (("host_vs_reference", host), ("arm64_vs_reference", arm)):
            c = per_sample_cosine(ref, emb)
            out[name] = {"min_cosine": float(c.min()), "mean_cosine": float(c.mean())}
    return out


def taps(model_path: Path, text: int, tokenizer_dir: Path) -> None:
    import onnx
    import onnxruntime as ort
    from onnx import helper
    from transformers import AutoTokenizer

    from edgeq.devices.arm64 import ensure_runtime, run_on_arm64
    from edgeq.runtime import encode
    from edgeq.textdata import EVALUATION_FILE, load_texts

    m = onnx.load(str(model_path))
    tapped = [(n.op_type, n.name, n.output[0]) for n in m.graph.node if n.op_type in (
        "QuantizeLinear", "LayerNormalization", "Softmax", "BiasGelu", "MatMulIntegerToFloat", "MatMulNBits", "MatMul")]
    outs = {o.name for o in m.graph.output}
    m.graph.output.extend(helper.make_empty_tensor_value_info(o) for _, _, o in tapped if o not in outs)
    dst = model_path.with_name(model_path.stem + "_taps.onnx")
    onnx.save(m, str(dst))
    sess = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])
    feeds = encode(AutoTokenizer.from_pretrained(str(tokenizer_dir)), load_texts(EVALUATION_FILE).head(text + 1)[text:],
                   128, [i.name for i in sess.get_inputs()])
    names = [o.name for o in sess.get_outputs()]
    host = dict(zip(names, sess.run(None, feeds)))
    arm = dict(zip(names, run_on_arm64(ensure_runtime(), dst, feeds).outputs))
    for op, name, o in tapped:
        x, y = host[o], arm[o]
        what = (f"uint8 differing {int((x != y).sum())}" if x.dtype == np.uint8 else
                f"max |diff| / max |x| {np.abs(x.astype(np.float64) - y).max() / (np.abs(x).max() + 1e-12):.2e}")
        print(f"{op:22s} {name[:64]:64s} {what}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("package", type=Path)
    ap.add_argument("--texts", type=int, default=32)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--taps", type=Path, help="an ORT-optimized .onnx of the package's model: per-node differences")
    ap.add_argument("--text", type=int, default=0, help="with --taps: which evaluation text")
    args = ap.parse_args()
    if args.taps:
        taps(args.taps, args.text, args.package)
        return
    r = agreement(args.package, args.texts)
    print(f"{r['package']}: {r['agree']} of {r['texts']} texts agree to float rounding on arm64 and x86; min cosine "
          f"{r['min_cosine']:.6f}, mean {r['mean_cosine']:.6f}, max |diff| / max |ref| {r['max_rel_diff']:.2e}")
    print("per text: " + ", ".join(f"{i}:{c}" for i, c in enumerate(r["per_text_cosine"]) if c < 1.0))
    if args.json:
        args.json.write_text(json.dumps(r, indent=1) + "\n")


if __name__ == "__main__":
    main()
