"""verify: a package is what its manifest says and still computes what it computed when it was made.

Checks, in order: every file in the manifest exists with its sha256 and size, and no file is unlisted; the
manifest's bars are not looser than its profile's; the model loads in ONNX Runtime; the stored sample inputs
reproduce the stored reference outputs (pooled embeddings, cosine at least ``min_cosine`` on every sample) on the
host; on a device target they must stay within the profile's accuracy budget of the stored FP32 outputs.

The manifest is not hashed, so its bars are never taken alone. They come from the profile the manifest names:
- a bundled profile (``export_profiles/<name>.toml``): its [package] (and [llm]) values, as this edgeq ships them;
- a profile from a .toml of the user's (not bundled; the manifest records its path, which verify does not read:
  the manifest chooses it): PackageSpec's and LLMSpec's defaults, which are the bundled profiles' values;
- any other name: refused (exit 2).
The manifest's recorded ``profile.values`` (the profile as applied, --set included) and its ``verification`` bars
count only where they are stricter. A stated bar looser than the profile's fails the "thresholds" check, and the
profile's bar is used. ``edgeq export`` verifies its fresh package against the profile it was built with.
"""

from __future__ import annotations

import hashlib
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from edgeq.errors import DeviceUnavailableError, PackageError, UserInputError
from edgeq.manifest import MANIFEST, Manifest, file_entries, read_manifest
from edgeq.metrics import per_sample_cosine
from edgeq.profiles import AccuracyBudget, LLMSpec, PackageSpec, Profile, known_profiles, load_profile
from edgeq.runtime import pool
from edgeq.targets import SampleRun, Target, get_target

# A device target is held to the stored FP32 outputs by the profile's accuracy budget; its agreement with the host's
# reference (package.device_min_cosine, device_max_rel_diff) is reported, and gated only for packages written
# before they stored FP32 outputs. A package that records no device bars (a QNN package) gets PackageSpec's.
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


# manifest verification key -> (profile [package] field, whether a higher value is the stricter)
BARS = {"min_cosine": ("verify_min_cosine", True), "max_rel_diff": ("verify_max_rel_diff", False),
        "device_min_cosine": ("device_min_cosine", True), "device_max_rel_diff": ("device_max_rel_diff", False)}


# the recorded profile values that can tighten a bar: (profile section, field, whether a higher value is stricter)
TIGHTENED = tuple(("package", f, higher) for f, higher in BARS.values()) + (
    ("package", "verify_samples", True), ("llm", "verify_tokens", True),
    ("accuracy", "min_mean_cosine", True), ("accuracy", "min_min_cosine", True))


@dataclass(frozen=True)
class Bars:
    """The profile's verification bars for a package, and the words that say where they come from."""

    package: PackageSpec
    llm: LLMSpec
    source: str
    accuracy: AccuracyBudget = AccuracyBudget()


def _stricter(a: float, b: float, higher: bool) -> float:
    return max(a, b) if higher else min(a, b)


def profile_bars(manifest: Manifest, profile: Profile | None = None) -> Bars:
    """The bars of the profile the manifest names (module doc), or of ``profile`` when the caller holds the one the
    package was built with; the manifest's recorded profile values tighten them, never loosen them."""
    name = manifest.profile.name
    if profile is not None:
        package, llm, accuracy = profile.package, profile.llm, profile.accuracy
        source = f"profile '{profile.name}' as exported"
    elif name in known_profiles():
        p = load_profile(name)
        package, llm, accuracy, source = p.package, p.llm, p.accuracy, f"profile '{name}'"
    elif (manifest.profile.file or "").endswith(".toml"):
        package, llm, accuracy = PackageSpec(), LLMSpec(), AccuracyBudget()
        source = f"edgeq's defaults (profile '{name}' is not bundled)"
    else:
        raise PackageError(f"the package names an unknown profile {name!r}, so its verification bars are unknown",
                           f"known profiles: {', '.join(known_profiles())}; re-export the package with one of them")
    values = manifest.profile.values
    specs = {"package": package, "llm": llm, "accuracy": accuracy}
    for spec, key, higher in TIGHTENED:
        v = values.recorded(spec, key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v):  # else it tightens nothing
            current = getattr(specs[spec], key)
            specs[spec] = replace(specs[spec], **{key: type(current)(_stricter(current, v, higher))})
    return Bars(specs["package"], specs["llm"], source, specs["accuracy"])


def check_thresholds(manifest: Manifest, bars: Bars, report: VerifyReport) -> dict[str, float]:
    """Fail the 'thresholds' check for every bar the manifest states looser than the profile's; return the bars
    verify applies (the stricter of the two, each)."""
    v = manifest.verification
    applied, looser = {}, []
    for key, (field_name, higher) in BARS.items():
        need = getattr(bars.package, field_name)
        stated = need if getattr(v, key) is None else getattr(v, key)
        if (stated < need) if higher else (stated > need):
            looser.append(f"verification.{key} = {stated} in the manifest is looser than {need} "
                          f"(package.{field_name} of {bars.source})")
        applied[key] = _stricter(stated, need, higher)
    rows = len(v.reference_pooled)
    if rows < bars.package.verify_samples:
        looser.append(f"verification holds {rows} samples, fewer than {bars.package.verify_samples} "
                      f"(package.verify_samples of {bars.source})")
    report.add("thresholds", not looser, "; ".join(looser) or
               f"min_cosine {applied['min_cosine']}, max_rel_diff {applied['max_rel_diff']}, device_min_cosine "
               f"{applied['device_min_cosine']}, device_max_rel_diff {applied['device_max_rel_diff']} "
               f"(at least as strict as {bars.source})")
    return applied


def check_files(folder: Path, manifest: Manifest, report: VerifyReport) -> None:
    listed = manifest.files
    actual = file_entries(folder)
    for name, entry in listed.items():
        got = actual.get(name)
        if got is None:
            report.add(f"file {name}", False, "missing")
        elif (got["sha256"], got["size"]) != (entry.sha256, entry.size):
            report.add(f"file {name}", False, f"sha256/size differ: manifest {entry.sha256[:12]}/{entry.size}, "
                                              f"file {got['sha256'][:12]}/{got['size']}")
        else:
            report.add(f"file {name}", True, f"sha256 {entry.sha256[:12]}, {entry.size} bytes")
    for name in sorted(set(actual) - set(listed) - {p.name for p in folder.glob("*.zip")}):  # zips: check_zip
        report.add(f"file {name}", False, "not listed in the manifest")


def check_zip(folder: Path, manifest: Manifest, report: VerifyReport) -> None:
    """A zip at the top of the package (edgeq writes <name>/<name>.zip; the manifest cannot list it, as it holds
    the manifest) holds the manifest's files and manifest.json under one folder, each byte for byte the folder's."""
    listed = manifest.files
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


def run_samples(folder: Path, manifest: Manifest, target: Target) -> list[SampleRun]:
    """The package's model files run on ``target`` over the manifest's stored sample inputs, pooled as the manifest
    says: one run per model file an app of that target may load."""
    v = manifest.verification
    feeds = {k: np.asarray(a, dtype=np.int64) for k, a in v.inputs.items()}
    return [replace(r, hidden=pool(r.hidden, feeds["attention_mask"], v.pooling))
            for r in target.run_samples(folder, manifest, feeds)]


def _verify_llm(folder: Path, manifest: Manifest, report: VerifyReport, bars: Bars, target: Target) -> VerifyReport:
    """LLM packages: onnxruntime-genai loads the folder and greedy decoding reproduces the stored tokens exactly on
    ``target`` (the host, or arm64: PyPI's aarch64 onnxruntime-genai under qemu; see edgeq/devices/arm64_genai.py).
    Decoding runs for the profile's llm.verify_tokens at least, so a manifest that stores fewer tokens than the
    model generates (a shortened reference) fails unless the model really stops there (EOS)."""
    from edgeq.llm.genai import check_genai_config
    from edgeq.llm.greedy import match_tokens

    v = manifest.verification
    want = list(v.greedy_tokens)
    check_genai_config(folder)  # before anything loads it, here or under qemu
    n = max(len(want), bars.llm.verify_tokens)
    target.check_available("causal-lm")  # a runtime that cannot be built is an error with a hint, not a finding
    try:
        got, where = target.greedy_tokens(folder, list(v.prompt_ids), n)
    except (DeviceUnavailableError, UserInputError):
        raise
    except Exception as exc:  # a load/generation failure is the finding, not a crash
        report.add("load and generate", False, f"{type(exc).__name__}: {exc}")
        return report
    same, detail = match_tokens(got, want, v.logit_margins)
    if not same and len(got) > len(want) and got[:len(want)] == want:
        detail = (f"the manifest stores {len(want)} greedy tokens but the model goes on past them; {bars.source} asks "
                  f"for {bars.llm.verify_tokens} (llm.verify_tokens)")
    report.add("load and generate", True, f"{manifest.model.file} through {where}")
    report.add("greedy tokens match reference", same, detail)
    return report


def verify(folder: Path, on: str = "host", profile: Profile | None = None) -> VerifyReport:
    """Check the package ``folder`` on target ``on`` (a name in edgeq.targets.TARGETS). ``profile``: the one the
    package was just built with (the export's own check); otherwise the bars come from the profile the manifest
    names (module doc). A malformed or unsafe package is a PackageError; a package that fails a check is a report
    whose ``ok`` is False."""
    target = get_target(on)
    folder = Path(folder)
    manifest = read_manifest(folder)
    bars = profile_bars(manifest, profile)
    target.check_package(folder, manifest)
    report = VerifyReport(folder, on)
    check_files(folder, manifest, report)
    if not report.ok:
        return report
    check_zip(folder, manifest, report)
    if manifest.is_llm:
        return _verify_llm(folder, manifest, report, bars, target)
    applied = check_thresholds(manifest, bars, report)
    target.check_available()  # a runtime that cannot be built is an error with a hint, not a finding
    try:
        runs = run_samples(folder, manifest, target)
    except (DeviceUnavailableError, PackageError):  # the machine or the package's layout, not a finding
        raise
    except Exception as exc:  # ORT load/run failure is the finding, not a crash
        report.add("load and run", False, f"{type(exc).__name__}: {exc}")
        return report
    try:
        ref = np.asarray(manifest.verification.reference_pooled, dtype=np.float32)
    except (TypeError, ValueError):  # ragged rows or non-numbers
        ref = np.zeros((0,), np.float32)
    for run in runs:  # several model files (qnn-htp): each check names its file
        check_outputs(run, ref, manifest, bars, applied, report, f" ({run.model})" if len(runs) > 1 else "")
    return report


def check_outputs(run: SampleRun, ref: np.ndarray, manifest: Manifest, bars: Bars, applied: dict[str, float],
                  report: VerifyReport, suffix: str = "") -> None:
    """One model file's pooled outputs against the stored reference (the host: the gate) or the stored FP32
    outputs (a device: the accuracy budget gates; agreement with the host's reference is reported)."""
    out = run.hidden
    if ref.shape != out.shape or not ref.size:  # the manifest is not hashed: an edited reference fails, not crashes
        report.add(f"outputs match reference{suffix}", False,
                   f"reference shape {ref.shape} differs from outputs {out.shape}")
        return
    cos = per_sample_cosine(ref, out)
    rel = float(np.abs(ref - out).max() / max(np.abs(ref).max(), 1e-12))
    report.add(f"load and run{suffix}", True, f"{run.model} on {run.where} ({len(ref)} samples)")
    per_sample = ", ".join(f"{c:.6f}" for c in cos)
    host = report.on == "host"
    need = applied["min_cosine"] if host else applied["device_min_cosine"]
    max_rel = applied["max_rel_diff"] if host else applied["device_max_rel_diff"]
    if host or manifest.verification.fp32_pooled is None:
        # the host reproduces its own reference; so did device checks before packages stored FP32 outputs
        report.add(f"outputs match reference{suffix}", bool(cos.min() >= need and rel <= max_rel),
                   f"min cosine {cos.min():.6f} (need >= {need} on every sample), max |diff| / max |ref| {rel:.2e} "
                   f"(need <= {max_rel}); per sample {per_sample}")
        return
    check_against_fp32(out, manifest, bars, report, suffix)
    # How far the target is from the host that built the package is a finding, not a gate: x86 hosts round int8
    # differently (an AVX2-only x86 saturates U8S8 sums; see edgeq/runtime.py), ARM and NPUs are the truth.
    note = "within" if cos.min() >= need and rel <= max_rel else "outside"
    report.add(f"agreement with the host's reference (reported, not gated){suffix}", True,
               f"min cosine {cos.min():.6f}, max |diff| / max |ref| {rel:.2e} ({note} the profile's expected "
               f"device_min_cosine {need} / device_max_rel_diff {max_rel}); per sample {per_sample}")


def check_against_fp32(out: np.ndarray, manifest: Manifest, bars: Bars, report: VerifyReport, suffix: str = "") -> None:
    """A device target's outputs against the FP32 model's, held to the profile's accuracy budget (the bar the
    export's own evaluation met on the host): every stored sample at least min_min_cosine, their mean at least
    min_mean_cosine. The FP32 outputs were computed on the host: FP32 differs between CPUs by ~1e-7 in cosine,
    far below any budget."""
    try:
        fp32 = np.asarray(manifest.verification.fp32_pooled, dtype=np.float32)
    except (TypeError, ValueError):  # ragged rows or non-numbers: the manifest is not hashed
        fp32 = np.zeros((0,), np.float32)
    if fp32.ndim != 2 or not len(fp32) or fp32.shape[1:] != out.shape[1:] or len(fp32) > len(out):
        report.add(f"outputs vs FP32 within the accuracy budget{suffix}", False,
                   f"stored FP32 outputs of shape {fp32.shape} do not fit the outputs {out.shape}")
        return
    b = bars.accuracy
    cos = per_sample_cosine(fp32, out[: len(fp32)])
    ok = bool(cos.min() >= b.min_min_cosine and cos.mean() >= b.min_mean_cosine)
    report.add(f"outputs vs FP32 within the accuracy budget{suffix}", ok,
               f"min cosine {cos.min():.6f} (need >= {b.min_min_cosine}), mean {cos.mean():.6f} (need >= "
               f"{b.min_mean_cosine}; accuracy budget of {bars.source}) on {len(fp32)} samples; per sample "
               f"{', '.join(f'{c:.6f}' for c in cos)}")
