"""A two-node Ray cluster on loopback, started by a test with ``ray start`` and stopped by its process groups.

Both nodes run on this machine with addresses of the loopback range: the head on 127.0.0.2, the second node on
127.0.0.3. Not 127.0.0.1: Ray rewrites "127.0.0.1" and "localhost" to the machine's outward address (its
resolve_ip_for_localhost), so a node given them would register, and the other would connect, there. Each
``ray start`` runs in a session of its own, so every process it leaves behind (GCS, raylet, agents, workers) is in
that process group, and ``stop`` ends exactly those: SIGTERM, then SIGKILL after STOP_WAIT_S (gcs_server does not
always go on SIGTERM). Usage statistics are off (RAY_USAGE_STATS_ENABLED=0, --disable-usage-stats).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HEAD_IP, NODE_IP = "127.0.0.2", "127.0.0.3"
START_TIMEOUT_S = 180
STOP_WAIT_S = 5.0
OBJECT_STORE_BYTES = 200_000_000  # the matrix passes paths, not data: keep /dev/shm use small


def ray_cli() -> Path | None:
    path = Path(sys.executable).parent / "ray"
    return path if path.is_file() else None


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def ray_env() -> dict[str, str]:
    """The nodes' environment (their workers inherit it): this checkout importable, no usage statistics."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "RAY_USAGE_STATS_ENABLED": "0", "HF_HUB_OFFLINE": "1"}


class RayCluster:
    def __init__(self, resources: dict[str, dict[str, float]] | None = None) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="edgeq-ray-", dir="/tmp"))  # short: Ray's socket paths live here
        self.port = free_port(HEAD_IP)
        self.resources = resources or {}
        self.groups: list[int] = []

    @property
    def address(self) -> str:
        return f"{HEAD_IP}:{self.port}"

    def _start(self, name: str, args: list[str]) -> None:
        folder = self.root / name
        folder.mkdir()
        extra = [f"--resources={json.dumps(self.resources[name])}"] if name in self.resources else []
        with open(self.root / f"{name}.log", "w") as log:
            p = subprocess.Popen([str(ray_cli()), "start", *args, f"--temp-dir={folder}", "--num-cpus=1",
                                  f"--object-store-memory={OBJECT_STORE_BYTES}", "--disable-usage-stats", *extra],
                                 env=ray_env(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                 start_new_session=True)
            self.groups.append(p.pid)  # the session's id: every process this node leaves behind is in it
            code = p.wait(timeout=START_TIMEOUT_S)
        if code != 0:
            raise RuntimeError(f"ray start ({name}) exited {code}: {(self.root / f'{name}.log').read_text()[-2000:]}")

    def start(self) -> RayCluster:
        self._start("head", ["--head", f"--node-ip-address={HEAD_IP}", f"--port={self.port}",
                             "--include-dashboard=false", "--dashboard-port=0"])
        self._start("node", [f"--address={self.address}", f"--node-ip-address={NODE_IP}"])
        return self

    def stop(self) -> None:
        for sig, wait in ((signal.SIGTERM, STOP_WAIT_S), (signal.SIGKILL, 5.0)):
            for group in self.groups:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(group, sig)
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and any(self._alive(g) for g in self.groups):
                time.sleep(0.2)

    @staticmethod
    def _alive(group: int) -> bool:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return False
        return True

    def processes(self) -> list[int]:
        """The PIDs left in the cluster's process groups (empty after stop)."""
        out = subprocess.run(["ps", "-eo", "pid=,pgid="], capture_output=True, text=True).stdout.split()
        return [int(pid) for pid, pgid in zip(out[::2], out[1::2]) if int(pgid) in self.groups]
