"""LLM packages on arm64: PyPI's aarch64 onnxruntime-genai wheel on the emulated runtime of edgeq/devices/arm64.py.

The wheel (the host's onnxruntime-genai version, manylinux aarch64, cp311) is installed by pip --platform into
``<runtime root>/genai-<version>/``, beside the stamped sysroot rather than inside it: the sysroot is shared and
rebuilt only when its recipe changes, and encoder packages do not need genai. The emulated Python finds it through
PYTHONPATH after the runtime's own site folder, so it loads the runtime's aarch64 onnxruntime.
:func:`greedy_tokens_on_arm64` runs ``arm64_genai_worker.py`` under qemu and returns the greedy tokens it decoded.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

from edgeq.devices.arm64 import PYTHON_VERSION, Arm64Runtime, _locked, _run, _tail, pip_platforms
from edgeq.errors import DeviceError, DeviceRunError
from edgeq.staging import die_with_parent

GENAI_WORKER = Path(__file__).resolve().with_name("arm64_genai_worker.py")


def ensure_genai(runtime: Arm64Runtime) -> Path:
    """The folder holding the aarch64 onnxruntime_genai package at the host's version, installed first if missing."""
    try:
        version = metadata.version("onnxruntime-genai")
    except metadata.PackageNotFoundError as exc:
        raise DeviceError("onnxruntime-genai is not installed on the host", "pip install onnxruntime-genai") from exc
    site = runtime.root / f"genai-{version}"
    with _locked(runtime.root / ".lock"):
        if (site / "onnxruntime_genai" / "__init__.py").is_file():
            return site
        tmp = Path(tempfile.mkdtemp(prefix=".genai-", dir=runtime.root))
        try:
            plat = [a for p in pip_platforms() for a in ("--platform", p)]
            r = _run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
                      "--only-binary=:all:", "--implementation", "cp", "--python-version", PYTHON_VERSION, *plat,
                      "--target", str(tmp), f"onnxruntime-genai=={version}"])
            if r.returncode != 0:
                raise DeviceError(f"pip could not install the aarch64 wheel onnxruntime-genai=={version}: "
                                  f"{_tail(r.stderr)}", "PyPI must be reachable and publish a cp311 manylinux "
                                  "aarch64 wheel of this version")
            tmp.replace(site)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return site


def greedy_tokens_on_arm64(runtime: Arm64Runtime, package_dir: Path, prompt_ids: list[int], n: int,
                           timeout: float = 1800.0) -> tuple[list[int], dict]:
    """(tokens, info): the ``n`` greedy tokens (fewer if EOS comes first) onnxruntime-genai appends to
    ``prompt_ids`` on emulated arm64, and what the worker reported (machine, versions, timings)."""
    site = ensure_genai(runtime)
    env = {**runtime.env(), "PYTHONPATH": f"{runtime.site}:{site}"}
    with tempfile.TemporaryDirectory(prefix="edgeq-arm64-genai-") as tmp:
        out = Path(tmp) / "out.json"
        cmd = runtime.command(str(GENAI_WORKER), "--package", str(Path(package_dir).resolve()), "--prompt-ids",
                              json.dumps([int(t) for t in prompt_ids]), "--tokens", str(n), "--out", str(out))
        try:
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=tmp,
                               preexec_fn=die_with_parent)
        except subprocess.TimeoutExpired as exc:
            raise DeviceRunError(f"greedy decoding did not finish on arm64 within {timeout:.0f}s",
                                 "emulation runs about 100 times slower than native: raise the timeout") from exc
        if r.returncode != 0 or not out.is_file():
            raise DeviceRunError(f"onnxruntime-genai failed on arm64 (exit {r.returncode}): "
                                 f"{_tail(r.stderr) or _tail(r.stdout)}",
                                 "the package must load and generate on the host first (edgeq verify)")
        info = json.loads(out.read_text())
    return info.pop("tokens"), info
