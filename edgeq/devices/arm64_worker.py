"""Run one ONNX / ORT-format model on ONNX Runtime's CPU execution provider and save what it computed.

This script runs inside the emulated arm64 CPython (see edgeq/devices/arm64.py), against the aarch64 onnxruntime
and numpy wheels from PyPI. It is self-contained on purpose: it imports only the standard library, numpy and
onnxruntime, never edgeq (whose dependencies are not installed for arm64).

    python3.11 arm64_worker.py --model M --inputs in.npz --outputs out.npz --info info.json
                               [--threads N] [--repeat R] [--maps maps.txt]
    python3.11 arm64_worker.py --features      # print the CPU features as JSON; imports neither numpy nor ORT

Outputs are saved as out0, out1, ... in the model's output order. The info JSON records where it ran
(platform.machine(), the CPU features the kernel -- here qemu -- reports through AT_HWCAP/AT_HWCAP2), the ONNX Runtime
version and providers, and load and run times. Exit status 0 on success; on failure a traceback is on stderr.
"""

from __future__ import annotations

import argparse
import json
import platform
import struct
import sys
import time

# Linux arm64 hwcap bit names, in bit order (arch/arm64/include/uapi/asm/hwcap.h), as /proc/cpuinfo prints them.
HWCAP = ["fp", "asimd", "evtstrm", "aes", "pmull", "sha1", "sha2", "crc32", "atomics", "fphp", "asimdhp", "cpuid",
         "asimdrdm", "jscvt", "fcma", "lrcpc", "dcpop", "sha3", "sm3", "sm4", "asimddp", "sha512", "sve", "asimdfhm",
         "dit", "uscat", "ilrcpc", "flagm", "ssbs", "sb", "paca", "pacg"]
HWCAP2 = ["dcpodp", "sve2", "sveaes", "svepmull", "svebitperm", "svesha3", "svesm4", "flagm2", "frint", "svei8mm",
          "svef32mm", "svef64mm", "svebf16", "i8mm", "bf16", "dgh", "rng", "bti", "mte", "ecv", "afp", "rpres", "mte3",
          "sme", "smei16i64", "smef64f64", "smei8i32", "smef16f32", "smeb16f32", "smef32f32", "smefa64", "wfxt",
          "ebf16", "sveebf16", "cssc", "rprfm", "sve2p1", "sme2", "sme2p1"]
AT_HWCAP, AT_HWCAP2 = 16, 26


def cpu_features() -> list[str]:
    """The CPU features the (emulated) kernel advertises to this process, read from the auxiliary vector."""
    try:
        with open("/proc/self/auxv", "rb") as f:
            raw = f.read()
    except OSError:
        return []
    aux = {}
    for i in range(0, len(raw) - 15, 16):
        key, value = struct.unpack("<QQ", raw[i:i + 16])
        aux[key] = value
    hw, hw2 = aux.get(AT_HWCAP, 0), aux.get(AT_HWCAP2, 0)
    return [n for i, n in enumerate(HWCAP) if hw >> i & 1] + [n for i, n in enumerate(HWCAP2) if hw2 >> i & 1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--features", action="store_true", help="print the CPU features as a JSON list and exit")
    ap.add_argument("--model")
    ap.add_argument("--inputs", help=".npz with 'names' (the input names) and in0, in1, ... (their arrays)")
    ap.add_argument("--outputs", help=".npz to write: out0, out1, ... in output order")
    ap.add_argument("--info", help="JSON to write: machine, onnxruntime version, providers, timings")
    ap.add_argument("--threads", type=int, default=1,
                    help="intra-op threads; 0: ONNX Runtime's default, one per emulated core, pinned to cores the host may lack")
    ap.add_argument("--repeat", type=int, default=1, help="run the model this many times (timing); outputs of the last")
    ap.add_argument("--maps", help="copy /proc/self/maps here after the run (to attribute traced instructions)")
    args = ap.parse_args(argv)
    if args.features:
        print(json.dumps({"machine": platform.machine(), "cpu_features": cpu_features()}))
        return 0
    if not (args.model and args.inputs and args.outputs and args.info):
        ap.error("--model, --inputs, --outputs and --info are required")

    import numpy as np
    import onnxruntime as ort

    ort.set_default_logger_severity(3)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if args.threads > 0:
        so.intra_op_num_threads = args.threads
    t0 = time.perf_counter()
    sess = ort.InferenceSession(args.model, so, providers=["CPUExecutionProvider"])
    load_s = time.perf_counter() - t0

    with np.load(args.inputs, allow_pickle=False) as z:  # names: the input names; in0, in1, ...: their arrays
        feeds = {str(name): z[f"in{i}"] for i, name in enumerate(z["names"])}
    wanted = [i.name for i in sess.get_inputs()]
    missing = [n for n in wanted if n not in feeds]
    if missing:
        raise SystemExit(f"inputs missing for model inputs {missing}; given {sorted(feeds)}")
    feeds = {n: feeds[n] for n in wanted}

    run_s = []
    outs = None
    for _ in range(max(args.repeat, 1)):
        t0 = time.perf_counter()
        outs = sess.run(None, feeds)
        run_s.append(time.perf_counter() - t0)

    np.savez(args.outputs, **{f"out{i}": np.asarray(o) for i, o in enumerate(outs)})
    info = {
        "machine": platform.machine(),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "numpy": np.__version__,
        "available_providers": ort.get_available_providers(),
        "session_providers": sess.get_providers(),
        "output_names": [o.name for o in sess.get_outputs()],
        "cpu_features": cpu_features(),
        "threads": args.threads,
        "load_seconds": load_s,
        "run_seconds": run_s,
    }
    with open(args.info, "w") as f:
        json.dump(info, f, indent=1)
    if args.maps:
        with open("/proc/self/maps") as src, open(args.maps, "w") as dst:
            dst.write(src.read())
    return 0


if __name__ == "__main__":
    sys.exit(main())
