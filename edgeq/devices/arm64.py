"""Run a model on the real aarch64 build of ONNX Runtime, under Debian's qemu-user-static.

Only the CPU is emulated: Debian's arm64 CPython and PyPI's aarch64 onnxruntime and numpy wheels run their ARM64
code (NEON, dot-product and i8mm kernels) on ``QEMU_CPU``, an ARMv9-A phone-class core like a Cortex-A710.
:func:`ensure_runtime` assembles that runtime once into ``<repo>/.cache/arm64-runtime`` (an installed edgeq:
``~/.cache/edgeq/arm64-runtime``) without touching the host's package state (root only to install a missing qemu; an ARM ``/proc/cpuinfo`` is written, as ONNX Runtime's cpuinfo
crashes on an x86 one); ``stamp.json`` rebuilds it when the versions or the recipe change. :func:`run_on_arm64` runs
``arm64_worker.py`` on it and returns the outputs with what the worker saw; ``trace_kernels=True`` reports which
int8 matrix instructions ran. The build steps, their costs and the kernels measured with it: see
docs/decisions/arm64-emulation.md.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote

import numpy as np

from edgeq.errors import DeviceError, DeviceRunError, DeviceUnavailableError
from edgeq.errors import UserInputError
from edgeq.staging import die_with_parent

log = logging.getLogger(__name__)



def cache_root(module_file: Path = Path(__file__)) -> Path:
    """A checkout keeps the runtime in its own .cache/ (CI and the Makefile look there); an installed edgeq uses the
    user's cache folder ($XDG_CACHE_HOME or ~/.cache), never its own site-packages."""
    checkout = Path(module_file).resolve().parents[2]
    if (checkout / "pyproject.toml").is_file() and (checkout / "edgeq" / "devices").is_dir():
        return checkout / ".cache"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgeq"


DEFAULT_CACHE = cache_root() / "arm64-runtime"
WORKER = Path(__file__).resolve().with_name("arm64_worker.py")
QEMU = Path("/usr/bin/qemu-aarch64-static")
STAMP = "stamp.json"

PYTHON_VERSION = "3.11"                       # Debian bookworm's python3; must match the host's cp311 wheels
DEBIAN_PACKAGES = ("python3.11", "libstdc++6")  # apt resolves the rest (libc6, libssl3, libffi8, ...)
GLIBC = (2, 36)                               # bookworm's: wheels tagged manylinux up to this glibc install
QEMU_CPU = "max,sme=off,sve-default-vector-length=16"  # ARMv9-A: SVE2 (128-bit), dotprod, i8mm, bf16; no SME
FAKE_CPUS = 4
# /proc/cpuinfo identity of the emulated core: Arm Cortex-A710 r2p0, a phone core with SVE2, dotprod, i8mm, bf16.
CPU_IDENTITY = {"implementer": "0x41", "architecture": "8", "variant": "0x2", "part": "0xd47", "revision": "0"}
RECIPE_VERSION = 1                            # bump when the build steps change in a way the fields below miss

BUILD_TIMEOUT = 1800.0
_TAIL = 3000


def pip_platforms() -> list[str]:
    return ["manylinux2014_aarch64"] + [f"manylinux_2_{m}_aarch64" for m in range(17, GLIBC[1] + 1)]


def recipe() -> dict:
    return {"version": RECIPE_VERSION, "python": PYTHON_VERSION, "debian_packages": list(DEBIAN_PACKAGES),
            "pip_platforms": pip_platforms(), "qemu_cpu": QEMU_CPU, "cpus": FAKE_CPUS, "cpu_identity": CPU_IDENTITY}


def recipe_hash() -> str:
    return hashlib.sha256(json.dumps(recipe(), sort_keys=True).encode()).hexdigest()


def host_versions() -> dict[str, str]:
    """The wheel versions the emulated runtime must have: the host venv's."""
    import onnxruntime

    return {"onnxruntime": onnxruntime.__version__, "numpy": np.__version__}


@dataclass(frozen=True)
class Arm64Runtime:
    """An assembled arm64 runtime: a sysroot with Debian's arm64 CPython plus PyPI's aarch64 wheels, run by qemu."""

    root: Path
    qemu: Path
    onnxruntime: str
    numpy: str
    cpu: str = QEMU_CPU
    cpus: int = FAKE_CPUS
    stamp: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def sysroot(self) -> Path:
        return self.root / "sysroot"

    @property
    def python(self) -> Path:
        return self.sysroot / "usr" / "bin" / f"python{PYTHON_VERSION}"

    @property
    def site(self) -> Path:
        return self.sysroot / "opt" / "edgeq-site"

    def command(self, *args: str, trace_log: Path | None = None) -> list[str]:
        """argv that runs the emulated Python with ``args`` (``-s``: no user site-packages)."""
        trace = ["-d", "in_asm", "-D", str(trace_log)] if trace_log else []
        return [str(self.qemu), "-cpu", self.cpu, "-L", str(self.sysroot), *trace, str(self.python), "-s", *args]

    def env(self) -> dict[str, str]:
        """A clean environment: no host PYTHON*/QEMU_* variables leak into the guest."""
        return {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONPATH": str(self.site), "PYTHONNOUSERSITE": "1",
                "PYTHONDONTWRITEBYTECODE": "1", "OPENBLAS_NUM_THREADS": "1"}


# ---------------------------------------------------------------------------------------------------------- build


def _tail(text: str | bytes | None) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    text = (text or "").strip()
    return text if len(text) <= _TAIL else "..." + text[-_TAIL:]


def _run(cmd: list[str], *, timeout: float = BUILD_TIMEOUT, env: dict | None = None,
         cwd: Path | None = None) -> subprocess.CompletedProcess:
    log.debug("run: %s", " ".join(cmd))
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)
    except subprocess.TimeoutExpired as exc:
        raise DeviceError(f"'{' '.join(cmd[:3])} ...' timed out after {timeout:.0f}s",
                          "check network access to the Debian mirrors and PyPI, then retry") from exc


def ensure_qemu() -> Path:
    """/usr/bin/qemu-aarch64-static, installed from Debian's qemu-user-static if it is missing."""
    if QEMU.is_file() and os.access(QEMU, os.X_OK):
        return QEMU
    if shutil.which("apt-get") is None:
        raise DeviceUnavailableError(f"{QEMU} is missing and this machine has no apt-get to install it",
                                     "install qemu-user-static (Debian/Ubuntu package) by hand")
    if os.geteuid() != 0:
        raise DeviceUnavailableError(f"{QEMU} is missing and installing qemu-user-static needs root",
                                     "run as root once, or: sudo apt-get install -y qemu-user-static")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    r = _run(["apt-get", "update", "-qq"], env=env)
    if r.returncode != 0:
        raise DeviceUnavailableError(f"apt-get update failed (exit {r.returncode}): {_tail(r.stderr)}",
                                     "check that the mirrors in /etc/apt/sources.list.d are reachable")
    r = _run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", "qemu-user-static"], env=env)
    if r.returncode != 0 or not QEMU.is_file():
        raise DeviceError(f"apt-get install qemu-user-static failed (exit {r.returncode}): {_tail(r.stderr)}",
                          "run 'apt-get install qemu-user-static' by hand to see why")
    return QEMU


def _private_apt(apt_dir: Path) -> list[str]:
    """apt-get options for an arm64-only apt with its own state and cache: host dpkg and lists are left alone."""
    for d in ("state/lists/partial", "cache/archives/partial"):
        (apt_dir / d).mkdir(parents=True, exist_ok=True)
    (apt_dir / "state" / "status").touch()
    return ["apt-get", "-o", "APT::Architecture=arm64", "-o", "APT::Architectures::=arm64",
            "-o", f"Dir::State={apt_dir / 'state'}", "-o", f"Dir::State::status={apt_dir / 'state' / 'status'}",
            "-o", f"Dir::Cache={apt_dir / 'cache'}", "-o", "Debug::NoLocking=1",
            "-o", "pkgCacheGen::Essential=none"]


def download_debs(apt_dir: Path) -> list[Path]:
    """Debian's arm64 .debs for DEBIAN_PACKAGES and their dependencies (no recommends, no Essential set)."""
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise DeviceUnavailableError("apt-get and dpkg-deb are needed to fetch Debian's arm64 packages",
                                     "build the arm64 runtime on a Debian bookworm host")
    apt = _private_apt(apt_dir)
    r = _run([*apt, "update", "-qq"])
    if r.returncode != 0:
        raise DeviceUnavailableError(f"apt-get update for the arm64 package lists failed (exit {r.returncode}): "
                                     f"{_tail(r.stderr)}",
                                     "check that the Debian mirrors in /etc/apt/sources.list.d are reachable")
    r = _run([*apt, "install", "-y", "-qq", "--download-only", "--no-install-recommends", *DEBIAN_PACKAGES])
    if r.returncode != 0:
        raise DeviceError(f"apt-get could not download arm64 {' '.join(DEBIAN_PACKAGES)} (exit {r.returncode}): "
                          f"{_tail(r.stderr) or _tail(r.stdout)}",
                          f"the host's apt sources must be Debian bookworm (python{PYTHON_VERSION}) with arm64 builds")
    debs = sorted((apt_dir / "cache" / "archives").glob("*.deb"))
    if not any(d.name.startswith(f"python{PYTHON_VERSION}_") for d in debs):
        raise DeviceError(f"apt-get downloaded no python{PYTHON_VERSION} package", "check the host's apt sources")
    return debs


def _pip_install(site: Path, versions: dict[str, str]) -> None:
    plat = [a for p in pip_platforms() for a in ("--platform", p)]
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-compile",
           "--only-binary=:all:", "--implementation", "cp", "--python-version", PYTHON_VERSION, *plat,
           "--target", str(site), f"onnxruntime=={versions['onnxruntime']}", f"numpy=={versions['numpy']}"]
    r = _run(cmd)
    if r.returncode != 0:
        raise DeviceError(f"pip could not install the aarch64 wheels onnxruntime=={versions['onnxruntime']} "
                          f"numpy=={versions['numpy']}: {_tail(r.stderr)}",
                          "PyPI must be reachable and publish cp311 manylinux aarch64 wheels of these versions")


def _guest(rt: Arm64Runtime, *args: str, timeout: float = 600.0, what: str = "") -> str:
    r = _run(rt.command(*args), env=rt.env(), timeout=timeout)
    if r.returncode != 0:
        raise DeviceError(f"the emulated arm64 Python failed {what} (exit {r.returncode}): "
                          f"{_tail(r.stderr) or _tail(r.stdout)}",
                          "delete the runtime cache folder and retry; report the error if it persists")
    return r.stdout


def cpuinfo_text(features: list[str], cpus: int = FAKE_CPUS) -> str:
    """An arm64 Linux /proc/cpuinfo for ``cpus`` identical cores with these hwcap feature names."""
    c = CPU_IDENTITY
    block = ("processor\t: {i}\nBogoMIPS\t: 48.00\nFeatures\t: {feat}\nCPU implementer\t: {implementer}\n"
             "CPU architecture: {architecture}\nCPU variant\t: {variant}\nCPU part\t: {part}\n"
             "CPU revision\t: {revision}\n\n")
    return "".join(block.format(i=i, feat=" ".join(features), **c) for i in range(cpus))


def write_cpu_tree(sysroot: Path, features: list[str], cpus: int = FAKE_CPUS) -> None:
    """proc/cpuinfo and sys/devices/system/cpu/ for the guest: one cluster of ``cpus`` cores, L1 64K, L2 512K."""
    (sysroot / "proc").mkdir(exist_ok=True)
    (sysroot / "proc" / "cpuinfo").write_text(cpuinfo_text(features, cpus))
    base = sysroot / "sys" / "devices" / "system" / "cpu"
    if base.exists():
        shutil.rmtree(base)
    span = f"0-{cpus - 1}" if cpus > 1 else "0"
    files = {"kernel_max": str(cpus - 1), "possible": span, "present": span, "online": span, "offline": ""}
    c = CPU_IDENTITY
    midr = (int(c["implementer"], 16) << 24 | int(c["variant"], 16) << 20 | 0xF << 16 | int(c["part"], 16) << 4
            | int(c["revision"]))
    for i in range(cpus):
        p = f"cpu{i}/"
        files.update({
            p + "online": "1",
            p + "regs/identification/midr_el1": f"0x{midr:016x}",
            p + "regs/identification/revidr_el1": "0x0000000000000000",
            p + "cpufreq/cpuinfo_max_freq": "2850000", p + "cpufreq/cpuinfo_min_freq": "600000",
            p + "topology/physical_package_id": "0", p + "topology/cluster_id": "0", p + "topology/core_id": str(i),
            p + "topology/core_siblings_list": span, p + "topology/package_cpus_list": span,
            p + "topology/cluster_cpus_list": span, p + "topology/thread_siblings_list": str(i),
            p + "topology/core_cpus_list": str(i),
        })
        caches = [(1, "Data", "64K", str(i)), (1, "Instruction", "64K", str(i)), (2, "Unified", "512K", str(i))]
        for k, (level, kind, size, shared) in enumerate(caches):
            q = f"{p}cache/index{k}/"
            files.update({q + "level": str(level), q + "type": kind, q + "size": size, q + "shared_cpu_list": shared,
                          q + "coherency_line_size": "64"})
    for rel, text in files.items():
        path = base / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n" if text else "\n")


def _dir_size(path: Path) -> int:
    return sum(f.lstat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def build(root: Path, qemu: Path, versions: dict[str, str]) -> dict:
    """Assemble the runtime in ``root/sysroot`` (replacing whatever is there); returns the stamp it wrote."""
    t0 = time.monotonic()
    (root / STAMP).unlink(missing_ok=True)
    for d in ("sysroot", "apt"):
        shutil.rmtree(root / d, ignore_errors=True)
    rt = Arm64Runtime(root, qemu, versions["onnxruntime"], versions["numpy"])
    rt.sysroot.mkdir(parents=True)

    debs = download_debs(root / "apt")
    for deb in debs:
        r = _run(["dpkg-deb", "-x", str(deb), str(rt.sysroot)])
        if r.returncode != 0:
            raise DeviceError(f"dpkg-deb -x {deb.name} failed: {_tail(r.stderr)}", "delete the cache and retry")
    # qemu -L resolves every absolute guest path inside the sysroot first: keep it free of folders the host's
    # paths (temp files, the repo) live in.
    for d in ("tmp", "work", "home", "root"):
        shutil.rmtree(rt.sysroot / d, ignore_errors=True)
    debian = dict(sorted(unquote(d.name).removesuffix(".deb").split("_")[:2] for d in debs))
    shutil.rmtree(root / "apt", ignore_errors=True)
    if not rt.python.is_file():
        raise DeviceError(f"the Debian packages did not provide {rt.python}", "check the host's apt sources")

    _pip_install(rt.site, versions)

    probe = json.loads(_guest(rt, str(WORKER), "--features", what="probing the CPU features").strip())
    if probe["machine"] != "aarch64":
        raise DeviceError(f"the emulated Python reports machine '{probe['machine']}', not aarch64",
                          "check /usr/bin/qemu-aarch64-static")
    write_cpu_tree(rt.sysroot, probe["cpu_features"])

    _guest(rt, "-m", "compileall", "-q", "-j", "0", str(rt.sysroot / "usr" / "lib" / f"python{PYTHON_VERSION}"),
           str(rt.site), what="byte-compiling the standard library and wheels")
    smoke = ("import json, platform, numpy, onnxruntime as ort; print(json.dumps({'machine': platform.machine(), "
             "'onnxruntime': ort.__version__, 'numpy': numpy.__version__, "
             "'providers': ort.get_available_providers()}))")
    got = json.loads(_guest(rt, "-c", smoke, what="importing onnxruntime").strip().splitlines()[-1])
    if got["onnxruntime"] != versions["onnxruntime"] or got["numpy"] != versions["numpy"] \
            or "CPUExecutionProvider" not in got["providers"]:
        raise DeviceError(f"the arm64 runtime imports {got}, expected {versions} with CPUExecutionProvider",
                          "delete the runtime cache folder and retry")

    qv = _run([str(qemu), "--version"]).stdout.splitlines()
    stamp = {**versions, "recipe": recipe_hash(), "recipe_fields": recipe(),
             "built": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "build_seconds": round(time.monotonic() - t0, 1),
             "size_bytes": _dir_size(rt.sysroot), "qemu": qv[0] if qv else "", "cpu_features": probe["cpu_features"],
             "providers": got["providers"], "debian": debian}
    tmp = root / (STAMP + ".tmp")
    tmp.write_text(json.dumps(stamp, indent=1) + "\n")
    tmp.replace(root / STAMP)
    log.debug("built arm64 runtime in %.1fs", stamp["build_seconds"])
    return stamp


@contextlib.contextmanager
def _locked(path: Path):
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def read_stamp(root: Path) -> dict:
    try:
        return json.loads((root / STAMP).read_text())
    except (OSError, ValueError):
        return {}


def is_current(root: Path, versions: dict[str, str] | None = None) -> bool:
    """True if ``root`` holds a complete runtime for these versions (default: the host's) and this recipe."""
    versions = versions or host_versions()
    stamp = read_stamp(root)
    return (bool(stamp) and stamp.get("recipe") == recipe_hash()
            and all(stamp.get(k) == v for k, v in versions.items())
            and (root / "sysroot" / "usr" / "bin" / f"python{PYTHON_VERSION}").is_file())


def ensure_runtime(cache_dir: Path = DEFAULT_CACHE, *, rebuild: bool = False) -> Arm64Runtime:
    """The arm64 runtime in ``cache_dir``, built first if it is missing, stale or ``rebuild`` is set.

    Idempotent and safe to call from several processes at once (a file lock serialises builds).
    """
    root = Path(cache_dir).resolve()
    qemu = ensure_qemu()
    versions = host_versions()
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / ".lock"):
        if rebuild or not is_current(root, versions):
            build(root, qemu, versions)
        stamp = read_stamp(root)
    return Arm64Runtime(root, qemu, versions["onnxruntime"], versions["numpy"], stamp=stamp)


# ------------------------------------------------------------------------------------------------------------ run


@dataclass
class Arm64Result:
    """Outputs of one run on arm64, in the model's output order, and what the worker reported."""

    outputs: list[np.ndarray]
    info: dict  # machine, python, onnxruntime, numpy, available_providers, session_providers, output_names,
    #             cpu_features, threads, load_seconds, run_seconds
    wall_seconds: float  # the whole emulated process: Python start, imports, load, runs, saving
    kernels: dict | None = None  # with trace_kernels: {instruction: {library: distinct instruction sites}}

    @property
    def names(self) -> list[str]:
        return list(self.info.get("output_names", []))


# Int8/bf16 matrix instructions, as (mask, value) over the 32-bit A64 encoding (Arm ARM, A64 SIMD and SVE).
KERNEL_INSTRUCTIONS: dict[str, tuple[tuple[int, int], ...]] = {
    "smmla": ((0xFFE0FC00, 0x4E80A400),),                          # i8mm, NEON
    "ummla": ((0xFFE0FC00, 0x6E80A400),),
    "usmmla": ((0xFFE0FC00, 0x4E80AC00),),
    "sdot": ((0xBFE0FC00, 0x0E809400), (0xBFC0F400, 0x0F80E000)),  # dotprod, vector and by-element
    "udot": ((0xBFE0FC00, 0x2E809400), (0xBFC0F400, 0x2F80E000)),
    "usdot": ((0xBFE0FC00, 0x0E809C00), (0xBFC0F400, 0x0F80F000)),  # i8mm mixed-sign dot
    "sudot": ((0xBFC0F400, 0x0F00F000),),
    "bfmmla": ((0xFFE0FC00, 0x6E40EC00),),                         # bf16
    "sve-sdot": ((0xFFA0FC00, 0x44800000),),
    "sve-udot": ((0xFFA0FC00, 0x44800400),),
    "sve-smmla": ((0xFFE0FC00, 0x45009800),),
    "sve-ummla": ((0xFFE0FC00, 0x45C09800),),
    "sve-usmmla": ((0xFFE0FC00, 0x45809800),),
    "fmla-fp16": ((0xBFE0FC00, 0x0E400C00),),                      # NEON half-precision arithmetic
}
_ASM_LINE = re.compile(r"^0x([0-9a-f]+):\s+([0-9a-f]{8})\s")


def _classify(word: int) -> str | None:
    for name, patterns in KERNEL_INSTRUCTIONS.items():
        if any(word & m == v for m, v in patterns):
            return name
    return None


def scan_kernels(trace_log: Path, maps: Path | None = None) -> dict[str, dict[str, int]]:
    """Which KERNEL_INSTRUCTIONS qemu translated (so ran), by library: {instruction: {library: sites}}.

    ``trace_log`` is qemu's ``-d in_asm`` log; ``maps`` the guest's /proc/self/maps, to name the library.
    """
    regions: list[tuple[int, int, str]] = []
    if maps and maps.is_file():
        for line in maps.read_text().splitlines():
            parts = line.split(None, 5)
            if len(parts) == 6 and parts[5].startswith("/"):
                lo, hi = (int(x, 16) for x in parts[0].split("-"))
                regions.append((lo, hi, Path(parts[5]).name))
    seen: set[int] = set()
    found: dict[str, dict[str, int]] = {}
    with open(trace_log, errors="replace") as f:
        for line in f:
            m = _ASM_LINE.match(line)
            if not m:
                continue
            addr = int(m.group(1), 16)
            if addr in seen:
                continue
            seen.add(addr)
            kind = _classify(int(m.group(2), 16))
            if kind:
                lib = next((name for lo, hi, name in regions if lo <= addr < hi), "?")
                found.setdefault(kind, {}).setdefault(lib, 0)
                found[kind][lib] += 1
    return found


def run_on_arm64(runtime: Arm64Runtime, model_path: Path, inputs: dict[str, np.ndarray], timeout: float = 900.0,
                 *, threads: int | None = None, repeat: int = 1, trace_kernels: bool = False) -> Arm64Result:
    """Run ``model_path`` (.onnx or .ort) with ``inputs`` on emulated arm64 ONNX Runtime (CPU EP).

    ``threads``: intra-op threads (default 1: under qemu a second thread made the MiniLM package slower, 1.72 s
    against 1.37 s a run on a 2-core host, and ONNX Runtime's results do not depend on it). ``repeat`` runs the
    model several times in one session (per-run times in ``info['run_seconds']``). Raises DeviceRunError if the
    worker fails or takes longer than ``timeout`` seconds.
    """
    model_path = Path(model_path).resolve()
    if not model_path.is_file():
        raise UserInputError(f"model {model_path} not found", "pass the package's model.ort or an .onnx file")
    threads = 1 if threads is None else max(1, threads)
    with tempfile.TemporaryDirectory(prefix="edgeq-arm64-") as tmp:
        tmp = Path(tmp)
        # keys in0, in1, ... and the names beside them: any input name is safe, even np.savez's own 'file'
        arrays = {f"in{i}": np.ascontiguousarray(v) for i, v in enumerate(inputs.values())}
        np.savez(tmp / "inputs.npz", names=np.array(list(inputs), dtype=str), **arrays)
        trace_log = tmp / "qemu-in_asm.log" if trace_kernels else None
        args = [str(WORKER), "--model", str(model_path), "--inputs", str(tmp / "inputs.npz"),
                "--outputs", str(tmp / "outputs.npz"), "--info", str(tmp / "info.json"),
                "--threads", str(threads), "--repeat", str(repeat)]
        if trace_kernels:
            args += ["--maps", str(tmp / "maps.txt")]
        t0 = time.monotonic()
        try:
            r = subprocess.run(runtime.command(*args, trace_log=trace_log), env=runtime.env(), capture_output=True,
                               text=True, timeout=timeout, cwd=tmp, preexec_fn=die_with_parent)
        except subprocess.TimeoutExpired as exc:
            raise DeviceRunError(f"{model_path.name} did not finish on arm64 within {timeout:.0f}s",
                                 "emulation runs about 100 times slower than native: raise the timeout") from exc
        wall = time.monotonic() - t0
        if r.returncode != 0 or not (tmp / "outputs.npz").is_file():
            err = _tail(r.stderr) or _tail(r.stdout)
            hint = ("the arm64 build hit an instruction the emulated CPU lacks" if "Illegal instruction" in err
                    else "the same model must load and run on the host first (edgeq verify)")
            raise DeviceRunError(f"{model_path.name} failed on arm64 ONNX Runtime {runtime.onnxruntime} "
                                 f"(exit {r.returncode}): {err}", hint)
        info = json.loads((tmp / "info.json").read_text())
        with np.load(tmp / "outputs.npz", allow_pickle=False) as z:
            outputs = [z[f"out{i}"] for i in range(len(z.files))]
        kernels = scan_kernels(trace_log, tmp / "maps.txt") if trace_kernels else None
    return Arm64Result(outputs, info, wall, kernels)
