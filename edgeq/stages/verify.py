"""verify: a package is what its manifest says and still computes what it computed when it was made.

Checks, in order: every file in the manifest exists with its sha256 and size, and no file is unlisted; the model
loads in ONNX Runtime; the stored sample inputs reproduce the stored reference outputs (pooled embeddings, cosine
at least the manifest's ``min_cosine``).
"""

from __future__ import annotations

import hashlib
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgeq.errors import DeviceUnavailableError, VerificationError
from edgeq.manifest import MANIFEST, file_entries, read_manifest
from edgeq.metrics import per_sample_cosine
from edgeq.profiles import PackageSpec
from edgeq.runtime import pool, session

TARGETS = ("host", "arm64", "qnn-htp")
# Off the host a package does not reproduce its reference bit for bit: last-bit float differences flip int8
# roundings, and the flips compound over the layers. The bars are the profile's package.device_min_cosine (per
# sample) and device_max_rel_diff, recorded in the manifest; see export_profiles/android-arm64.toml for what MiniLM
# measures. A package written before those fields existed gets PackageSpec's defaults.
DEVICE_DEFAULTS = {"device_min_cosine": PackageSpec().device_min_cosine,
                   "device_max_rel_diff": PackageSpec().device_max_rel_diff}


@dataclass
class VerifyReport:
    package: Path
    on: str
    checks: list[tuple[str, bool, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(ok for _, ok, _ in self.checks)

    def add(self, name: str, ok: bool, detail: str) -> None:
        self.checks.append((name, ok, detail))


def check_files(folder: Path, manifest: dict, report: VerifyReport) -> None:
    listed = manifest.get("files", {})
    actual = file_entries(folder)
    for name, entry in listed.items():
        got = actual.get(name)
        if got is None:
            report.add(f"file {name}", False, "missing")
        elif got != entry:
            report.add(f"file {name}", False, f"sha256/size differ: manifest {entry['sha256'][:12]}/{entry['size']}, "
                                              f"file {got['sha256'][:12]}/{got['size']}")
        else:
            report.add(f"file {name}", True, f"sha256 {entry['sha256'][:12]}, {entry['size']} bytes")
    for name in sorted(set(actual) - set(listed) - {p.name for p in folder.glob("*.zip")}):  # zips: check_zip
        report.add(f"file {name}", False, "not listed in the manifest")


def check_zip(folder: Path, manifest: dict, report: VerifyReport) -> None:
    """A zip at the top of the package (edgeq writes <name>/<name>.zip; the manifest cannot list it, as it holds
    the manifest) holds the manifest's files and manifest.json under one folder, each byte for byte the folder's."""
    listed = manifest.get("files", {})
    want = sorted([*listed, MANIFEST])
    for path in sorted(p for p in folder.glob("*.zip") if p.name not in listed):
        try:
            with zipfile.ZipFile(path) as z:
                infos = sorted(z.infolist(), key=lambda i: i.filename.partition("/")[2])
                names = [i.filename.partition("/")[2] for i in infos]
                if len({i.filename.partition("/")[0] for i in infos}) != 1 or names != want:
                    odd = sorted(set(names) ^ set(want)) or ["members outside one top folder"]
                    report.add(f"zip {path.name}", False, f"members differ from the package: {', '.join(odd)[:300]}")
                    continue
                differ = []
                for info, name in zip(infos, names):
                    with z.open(info) as a, open(folder / name, "rb") as b:
                        if hashlib.file_digest(a, "sha256").digest() != hashlib.file_digest(b, "sha256").digest():
                            differ.append(name)
        except (zipfile.BadZipFile, OSError, EOFError, NotImplementedError) as exc:
            report.add(f"zip {path.name}", False, f"not a readable zip: {exc}")
            continue
        report.add(f"zip {path.name}", not differ, f"differs from the folder's {', '.join(differ)}" if differ else
                   f"{len(names)} files, each byte for byte the folder's")


def run_samples(folder: Path, manifest: dict, arm64=None, on: str = "host") -> tuple[np.ndarray, str]:
    """Pooled outputs of the package's model for the manifest's stored sample inputs, and where they ran: the host's
    ONNX Runtime, ``arm64`` (an edgeq.devices.arm64.Arm64Runtime) if given, or the QNN HTP simulator."""
    v = manifest["verification"]
    model = folder / manifest["model"]["file"]
    feeds = {k: np.asarray(a, dtype=np.int64) for k, a in v["inputs"].items()}
    batch = manifest["model"].get("batch_size")  # static-shape models take their stored rows batch by batch
    if on == "qnn-htp":
        from edgeq.devices.qnn_htp import run_package

        hidden, where = run_package(folder, manifest, feeds)
    elif batch:
        sess = session(model)
        hidden = np.concatenate([sess.run(None, {k: a[i:i + batch] for k, a in feeds.items()})[0]
                                 for i in range(0, len(feeds["attention_mask"]), batch)])
        where = "host"
    elif arm64 is not None:
        from edgeq.devices.arm64 import run_on_arm64

        res = run_on_arm64(arm64, model, feeds)
        hidden, where = res.outputs[0], f"{res.info['machine']} onnxruntime {res.info['onnxruntime']} under qemu"
    else:
        hidden, where = session(model).run(None, feeds)[0], "host"
    return pool(hidden, feeds["attention_mask"], v["pooling"]), where


def _verify_llm(folder: Path, manifest: dict, report: VerifyReport) -> VerifyReport:
    """LLM packages: onnxruntime-genai loads the folder and greedy decoding reproduces the stored tokens exactly --
    on the host, or on arm64 (PyPI's aarch64 onnxruntime-genai under qemu; see edgeq/devices/arm64_genai.py)."""
    from edgeq.llm.chain import match_tokens, verify_llm

    v = manifest["verification"]
    runtime = None
    if report.on == "arm64":  # a runtime that cannot be built is an error with a hint, not a finding
        from edgeq.devices.arm64 import ensure_runtime
        from edgeq.devices.arm64_genai import ensure_genai

        runtime = ensure_runtime()
        ensure_genai(runtime)
    try:
        if runtime is None:
            same, detail = verify_llm(folder, manifest)
            where = "onnxruntime-genai"
        else:
            from edgeq.devices.arm64_genai import greedy_tokens_on_arm64

            got, info = greedy_tokens_on_arm64(runtime, folder, v["prompt_ids"], len(v["greedy_tokens"]))
            same, detail = match_tokens(got, v["greedy_tokens"], v.get("logit_margins"))
            where = (f"onnxruntime-genai {info['onnxruntime_genai']} on {info['machine']} onnxruntime "
                     f"{info['onnxruntime']} under qemu")
    except Exception as exc:  # a load/generation failure is the finding, not a crash
        report.add("load and generate", False, f"{type(exc).__name__}: {exc}")
        return report
    report.add("load and generate", True, f"{manifest['model']['file']} through {where}")
    report.add("greedy tokens match reference", same, detail)
    return report


def verify(folder: Path, on: str = "host") -> VerifyReport:
    if on not in TARGETS:
        raise VerificationError(f"unknown verification target '{on}'", f"targets available: {', '.join(TARGETS)}")
    folder = Path(folder)
    manifest = read_manifest(folder)
    report = VerifyReport(folder, on)
    check_files(folder, manifest, report)
    if not report.ok:
        return report
    check_zip(folder, manifest, report)
    if manifest.get("source", {}).get("kind") == "causal-lm":
        return _verify_llm(folder, manifest, report)
    if on == "qnn-htp" and "context_file" not in manifest["model"]:
        raise VerificationError(f"{folder} has no EPContext model: it was not built for the QNN EP",
                                "verify it --on host or --on arm64, or re-export it with --profile android-qnn-htp")
    arm64 = None
    if on == "arm64":  # a runtime that cannot be built is an error with a hint, not a finding about the package
        from edgeq.devices.arm64 import ensure_runtime

        arm64 = ensure_runtime()
    try:
        out, where = run_samples(folder, manifest, arm64, on)
    except DeviceUnavailableError:
        raise
    except Exception as exc:  # ORT load/run failure is the finding, not a crash
        report.add("load and run", False, f"{type(exc).__name__}: {exc}")
        return report
    ref = np.asarray(manifest["verification"].get("reference_pooled", []), dtype=np.float32)
    if ref.shape != out.shape:  # the manifest is not hashed: an edited reference is a failed check, not a crash
        report.add("outputs match reference", False, f"reference shape {ref.shape} differs from outputs {out.shape}")
        return report
    cos = per_sample_cosine(ref, out)
    rel = float(np.abs(ref - out).max() / max(np.abs(ref).max(), 1e-12))
    ran = where if on == "qnn-htp" else f"{manifest['model']['file']} on {where}"  # qnn-htp names the EPContext model
    report.add("load and run", True, f"{ran} ({len(ref)} samples)")
    per_sample = ", ".join(f"{c:.6f}" for c in cos)
    v = manifest["verification"]
    if on == "host" or "fp32_pooled" not in v:  # the host reproduces its own reference; so did device checks before
        v = {**DEVICE_DEFAULTS, **v}              # packages stored FP32 outputs, to the profile's agreement bar
        need, max_rel = (v["min_cosine"], v["max_rel_diff"]) if on == "host" else (v["device_min_cosine"],
                                                                                   v["device_max_rel_diff"])
        report.add("outputs match reference", bool(cos.min() >= need and rel <= max_rel),
                   f"min cosine {cos.min():.6f} (need >= {need} on every sample), max |diff| / max |ref| {rel:.2e} "
                   f"(need <= {max_rel}); per sample {per_sample}")
        return report
    check_against_fp32(out, manifest, report)
    # How far the target is from the host that built the package is a finding, not a gate: x86 hosts round int8
    # differently (an AVX2-only x86 saturates U8S8 sums; see edgeq/runtime.py), ARM and NPUs are the truth.
    v = {**DEVICE_DEFAULTS, **v}
    expected = cos.min() >= v["device_min_cosine"] and rel <= v["device_max_rel_diff"]
    note = "within" if expected else "outside"
    report.add("agreement with the host's reference (reported, not gated)", True,
               f"min cosine {cos.min():.6f}, max |diff| / max |ref| {rel:.2e} ({note} the profile's expected "
               f"device_min_cosine {v['device_min_cosine']} / device_max_rel_diff {v['device_max_rel_diff']}); "
               f"per sample {per_sample}")
    return report


def check_against_fp32(out: np.ndarray, manifest: dict, report: VerifyReport) -> None:
    """A device target's outputs against the FP32 model's, held to the profile's accuracy budget (the bar the
    export's own evaluation met on the host): every stored sample at least min_min_cosine, their mean at least
    min_mean_cosine. The FP32 outputs were computed on the host: FP32 differs between CPUs by ~1e-7 in cosine,
    far below any budget."""
    fp32 = np.asarray(manifest["verification"]["fp32_pooled"], dtype=np.float32)
    budget = manifest["accuracy"]["budget"]
    cos = per_sample_cosine(fp32, out[: len(fp32)])
    ok = bool(cos.min() >= budget["min_min_cosine"] and cos.mean() >= budget["min_mean_cosine"])
    report.add("outputs vs FP32 within the accuracy budget", ok,
               f"min cosine {cos.min():.6f} (need >= {budget['min_min_cosine']}), mean {cos.mean():.6f} (need >= "
               f"{budget['min_mean_cosine']}) on {len(fp32)} samples; per sample {', '.join(f'{c:.6f}' for c in cos)}")
