"""Wall time and peak RSS of one command, its own and not its parent's, with a timeout and an RSS cap.

Why two processes: Linux carries a process's peak RSS across execve (the old address space's high-water mark goes
into the new program's ru_maxrss), and Python's subprocess starts children with vfork, whose "old address space" is
the parent's. So ``ru_maxrss`` of a child started from a 2 GB parent reads at least 2 GB (issue 15, item 0). Here the
parent starts a tiny launcher (a bare ``python -c``, ~10 MB); the launcher starts the command, waits for it with
``os.wait4`` and reports the command's rusage: its peak is the command's own (with its reaped descendants, as
``wait4`` gives them), floored at the launcher's ~10 MB rather than at the parent's size.

Meanwhile the parent samples the resident set of every process in the command's session (launcher excluded) every
``SAMPLE_S``; above ``cap_gb`` it kills the session and records "killed at N GB". The sampled sum also counts
processes running side by side, which ``ru_maxrss`` (a per-process maximum) does not. RSS includes file pages
mapped by the process (safetensors and ONNX external data read through mmap): memory the machine must hold all
the same.

This module imports nothing heavy, so the process running it stays small.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

GB = 1e9
SAMPLE_S = 0.2
RSS_SERIES = "rss.tsv"
_PAGE = os.sysconf("SC_PAGE_SIZE")

# Runs as ``python -c``: start argv[1:], wait4 it, write {returncode, wall_s, maxrss_kb, utime, stime} to $RESULT.
_LAUNCHER = """
import json, os, sys, time
t = time.monotonic()
pid = os.posix_spawnp(sys.argv[1], sys.argv[1:], os.environ)
_, status, ru = os.wait4(pid, 0)
wall = time.monotonic() - t
rc = os.waitstatus_to_exitcode(status)
with open(os.environ["SCALE_RESULT"], "w") as f:
    json.dump({"returncode": rc, "wall_s": wall, "maxrss_kb": ru.ru_maxrss, "user_s": ru.ru_utime,
               "sys_s": ru.ru_stime}, f)
"""


@dataclass(frozen=True)
class Measurement:
    status: str  # "ok", "failed (exit N)", "killed at N GB (cap C GB)", "timeout after N s"
    returncode: int | None
    wall_s: float
    peak_rss_gb: float  # max(wait4 ru_maxrss of the command, sampled session sum)
    wait4_peak_gb: float | None  # None when the command was killed (no rusage)
    sampled_peak_gb: float
    cpu_s: float | None
    stderr_tail: str

    def to_dict(self) -> dict:
        return asdict(self)


def session_rss_bytes(sid: int, exclude: int) -> int:
    """Resident bytes of every live process whose session id is sid, exclude's own left out."""
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == exclude:
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state ppid pgrp session ...
            if int(fields[3]) != sid:
                continue
            total += int(Path(f"/proc/{entry}/statm").read_text().split()[1]) * _PAGE
        except (OSError, ValueError, IndexError):  # the process ended while we read it
            continue
    return total


def read_series(log_dir: Path) -> list[tuple[float, int]]:
    """The sampled (seconds, resident bytes) series ``run`` wrote to log_dir."""
    path = log_dir / RSS_SERIES
    if not path.is_file():
        return []
    return [(float(t), int(b)) for t, b in (ln.split("\t") for ln in path.read_text().splitlines() if ln)]


def _tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def run(cmd: list[str], *, log_dir: Path, cap_gb: float = 20.0, timeout_s: float = 900.0,
        env: dict[str, str] | None = None, cwd: Path | None = None) -> Measurement:
    """Run cmd to completion (or until the cap or the timeout); its stdout/stderr go to log_dir."""
    log_dir.mkdir(parents=True, exist_ok=True)
    fd, result_path = tempfile.mkstemp(prefix="scale-", suffix=".json", dir=log_dir)
    os.close(fd)
    result = Path(result_path)
    result.write_text("")
    err_path = log_dir / "stderr.txt"
    # the sampled series (seconds since start, resident bytes), so a caller can split the peak by stage
    with open(log_dir / "stdout.txt", "wb") as out, open(err_path, "wb") as err, \
            open(log_dir / RSS_SERIES, "w") as series:
        proc = subprocess.Popen([sys.executable, "-S", "-c", _LAUNCHER, *cmd], stdout=out, stderr=err,
                                stdin=subprocess.DEVNULL, cwd=cwd, start_new_session=True,
                                env=(env if env is not None else dict(os.environ)) | {"SCALE_RESULT": str(result)})
        t0 = time.monotonic()
        sampled, stop = 0, None
        while proc.poll() is None:
            rss = session_rss_bytes(proc.pid, exclude=proc.pid)
            sampled = max(sampled, rss)
            elapsed = time.monotonic() - t0
            series.write(f"{elapsed:.2f}\t{rss}\n")
            if rss > cap_gb * GB:
                stop = f"killed at {rss / GB:.1f} GB (cap {cap_gb:g} GB) after {elapsed:.0f} s"
            elif elapsed > timeout_s:
                stop = f"timeout after {timeout_s:.0f} s"
            if stop:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                break
            time.sleep(SAMPLE_S)
        wall = time.monotonic() - t0
    data = json.loads(result.read_text() or "null")
    result.unlink()
    if stop or data is None:
        return Measurement(stop or f"launcher failed (exit {proc.returncode})", None, wall, sampled / GB, None,
                           sampled / GB, None, _tail(err_path))
    wait4_gb = data["maxrss_kb"] * 1024 / GB
    rc = data["returncode"]
    return Measurement("ok" if rc == 0 else f"failed (exit {rc})", rc, data["wall_s"], max(wait4_gb, sampled / GB),
                       wait4_gb, sampled / GB, data["user_s"] + data["sys_s"], _tail(err_path))
