"""Greedy decoding of an onnxruntime-genai package folder, inside the emulated arm64 CPython (see arm64_genai.py).

Self-contained like arm64_worker.py: the standard library and onnxruntime_genai only (the aarch64 wheel, which loads
the aarch64 onnxruntime beside it). The search is edgeq.llm.genai.greedy_tokens': greedy, max_length = prompt + n.

    python3.11 arm64_genai_worker.py --package DIR --prompt-ids '[1, 2, 3]' --tokens 16 --out out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--package", required=True)
    ap.add_argument("--prompt-ids", required=True, help="JSON list of the prompt's token ids")
    ap.add_argument("--tokens", type=int, required=True, help="new tokens to generate (fewer if EOS comes first)")
    ap.add_argument("--out", required=True, help="JSON to write: tokens, machine, versions, timings")
    args = ap.parse_args(argv)

    import onnxruntime
    import onnxruntime_genai as og

    prompt = [int(t) for t in json.loads(args.prompt_ids)]
    t0 = time.perf_counter()
    model = og.Model(args.package)
    load_s = time.perf_counter() - t0
    params = og.GeneratorParams(model)
    params.set_search_options(do_sample=False, max_length=len(prompt) + args.tokens)
    generator = og.Generator(model, params)
    t0 = time.perf_counter()
    generator.append_tokens(prompt)
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    info = {"tokens": tokens, "machine": platform.machine(), "onnxruntime": onnxruntime.__version__,
            "onnxruntime_genai": getattr(og, "__version__", "?"), "load_seconds": load_s,
            "generate_seconds": time.perf_counter() - t0}
    with open(args.out, "w") as f:
        json.dump(info, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
