"""ONNX Runtime's QNN execution provider with Qualcomm's HTP backend: on this x86 host, the Hexagon NPU simulator.

The ``onnxruntime-qnn`` wheel is an EP plugin: its ``libonnxruntime_providers_qnn.so`` is registered with
``onnxruntime.register_execution_provider_library`` and added for its devices with ``backend_path`` pointing at
``libQnnHtp.so``, which on x86_64 is the HTP simulator (the same QNN graph compiler and fixed-point kernels as the
phone, executed on the CPU). Sessions run with ``session.disable_cpu_ep_fallback = 1``: a node HTP cannot take makes
the session fail instead of silently running on the CPU, so a session that loads has 100% of its nodes on HTP.
``htp_arch``/``soc_model`` select the Hexagon generation (the simulator's default, v68, refuses 16-bit-weight
FullyConnected; v73+ takes it); callers pass them (the profile's [qnn], or the manifest's for a package: see
edgeq.targets.qnn_htp). Apart from the EP and that one config entry, sessions use ONNX Runtime's default options, as
an app's would.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edgeq.errors import DeviceRunError, DeviceUnavailableError, PackageError
from edgeq.manifest import REEXPORT
from edgeq.profiles import QNN_EP as EP

INSTALL_HINT = "pip install 'edgeq[qnn]' (the onnxruntime-qnn wheel from PyPI; it carries the x86_64 HTP simulator)"
_registered = False


def qnn_module():
    try:
        import onnxruntime_qnn
    except ImportError as exc:
        raise DeviceUnavailableError("the QNN execution provider (onnxruntime-qnn) is not installed", INSTALL_HINT) from exc
    return onnxruntime_qnn


def _devices():
    global _registered
    qnn = qnn_module()
    if not _registered:
        ort.register_execution_provider_library(EP, qnn.get_library_path())
        _registered = True
    devices = [d for d in ort.get_ep_devices() if d.ep_name == EP]
    if not devices:
        raise DeviceUnavailableError("the QNN execution provider registered no device", INSTALL_HINT)
    return qnn, devices


def htp_options(soc_model: int | None, htp_arch: int | None) -> dict[str, str]:
    """QNN EP options for the SoC; None for both: none, as an app that names no SoC (the simulator then is v68)."""
    return {} if soc_model is None else {"soc_model": str(soc_model), "htp_arch": str(htp_arch)}


def _options(soc_model: int | None, htp_arch: int | None, fallback: bool, extra: dict[str, str] | None = None) -> ort.SessionOptions:
    qnn, devices = _devices()
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.add_session_config_entry("session.disable_cpu_ep_fallback", "0" if fallback else "1")
    so.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    for k, v in (extra or {}).items():
        so.add_session_config_entry(k, v)
    so.add_provider_for_devices(devices, {"backend_path": qnn.get_qnn_htp_path(), **htp_options(soc_model, htp_arch)})
    return so


@dataclass(frozen=True)
class Placement:
    """Which EP took the graph's nodes: counts and number of partitions (subgraphs) per EP."""

    nodes: dict[str, int]
    partitions: dict[str, int]

    @property
    def htp_fraction(self) -> float:
        total = sum(self.nodes.values())
        return self.nodes.get(EP, 0) / total if total else 0.0

    def to_dict(self) -> dict:
        return {"nodes": self.nodes, "partitions": self.partitions, "htp_fraction": round(self.htp_fraction, 6)}


def placement(sess: ort.InferenceSession) -> Placement:
    nodes: dict[str, int] = {}
    parts: dict[str, int] = {}
    for sub in sess.get_provider_graph_assignment_info():
        nodes[sub.ep_name] = nodes.get(sub.ep_name, 0) + len(sub.get_nodes())
        parts[sub.ep_name] = parts.get(sub.ep_name, 0) + 1
    return Placement(nodes, parts)


def cpu_nodes(model_path: Path, soc_model: int | None, htp_arch: int | None) -> list[str]:
    """Nodes HTP refuses, from a session that is allowed to fall back (only to explain a failure)."""
    sess = ort.InferenceSession(str(model_path), _options(soc_model, htp_arch, fallback=True))
    out = []
    for sub in sess.get_provider_graph_assignment_info():
        if sub.ep_name != EP:
            out += [f"{n.name} ({n.op_type})" for n in sub.get_nodes()]
    return out


def htp_session(model_path: Path, soc_model: int | None, htp_arch: int | None,
                extra: dict[str, str] | None = None) -> ort.InferenceSession:
    """A session with every node on HTP, or DeviceRunError naming the nodes that HTP refused."""
    try:
        return ort.InferenceSession(str(model_path), _options(soc_model, htp_arch, fallback=False, extra=extra))
    except (ort.capi.onnxruntime_pybind11_state.Fail, ort.capi.onnxruntime_pybind11_state.EPFail, RuntimeError) as exc:
        try:
            refused = cpu_nodes(model_path, soc_model, htp_arch)
        except Exception:  # the explanation is best effort; the failure itself is reported below
            refused = []
        named = f"; nodes HTP refused: {', '.join(refused[:8])}{' ...' if len(refused) > 8 else ''}" if refused else ""
        arch = f"v{htp_arch}" if htp_arch is not None else "the backend's default"
        raise DeviceRunError(f"{model_path.name} does not run entirely on QNN HTP (htp_arch {arch}): {exc}{named}",
                             "quantize the refused ops (QDQ), or keep them out of the graph; HTP has no CPU fallback "
                             "on purpose") from exc


def compile_context(qdq_path: Path, ctx_path: Path, soc_model: int, htp_arch: int) -> Placement:
    """Write ``ctx_path``: an ONNX model whose single EPContext node embeds the QNN context binary compiled from
    ``qdq_path`` for the SoC (``ep.context_embed_mode = 1``: one self-contained file)."""
    sess = htp_session(qdq_path, soc_model, htp_arch, {
        "ep.context_enable": "1", "ep.context_file_path": str(ctx_path), "ep.context_embed_mode": "1"})
    if not ctx_path.is_file():
        raise DeviceRunError(f"the QNN EP did not write the EPContext model {ctx_path}", "this is an edgeq bug; please report it")
    return placement(sess)


@dataclass(frozen=True)
class HtpRun:
    outputs: list[np.ndarray]  # first output of each run
    placement: Placement
    load_seconds: float
    run_seconds: list[float]


def run_htp(model_path: Path, feeds: list[dict[str, np.ndarray]], soc_model: int | None, htp_arch: int | None) -> HtpRun:
    t = time.perf_counter()
    sess = htp_session(model_path, soc_model, htp_arch)
    load = time.perf_counter() - t
    outs, times = [], []
    for f in feeds:
        t = time.perf_counter()
        outs.append(sess.run(None, f)[0])
        times.append(time.perf_counter() - t)
    return HtpRun(outs, placement(sess), load, times)


def check_embedded_context(ctx_path: Path) -> None:
    """A package's EPContext nodes must embed their context binary (``embed_mode`` 1, as edgeq writes them): with
    0, ``ep_cache_context`` is a path the QNN EP opens, which a stranger's package could point anywhere."""
    import onnx

    model = onnx.load(str(ctx_path), load_external_data=False)
    for node in model.graph.node:
        if node.op_type == "EPContext":
            mode = next((a.i for a in node.attribute if a.name == "embed_mode"), 1)  # the contrib op's default is 1
            if mode != 1:
                raise PackageError(f"{ctx_path.name}: EPContext node {node.name!r} has embed_mode {mode}, naming a "
                                   "context binary outside the model", REEXPORT)
