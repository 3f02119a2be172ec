"""Where an export writes: a staging folder in OUT, claimed with a lock, moved into place in one step.

``staged(dest, force, needed)`` is the whole life of one export's files in OUT:
- SIGINT, SIGTERM and SIGHUP raise ``Interrupted`` (a KeyboardInterrupt), so every ``finally:`` runs and the
  staging folder and the lock go. Signals that come while the lock is taken or dropped, the staging folder made or
  removed, or the package placed are held until that step is over.
- OUT/<name> is claimed with flock on OUT/.<name>.edgeq-lock: a second export into it fails at once. The kernel
  drops the lock when its process dies, so a lock file left by SIGKILL is taken over by the next export.
- the free space of OUT is checked first, and a disk that fills up at any point is one DiskFullError.
Nothing is left in OUT but the finished package, whatever happens short of SIGKILL.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import math
import os
import shutil
import signal
import sys
import tempfile
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from edgeq.errors import DestinationBusyError, DiskFullError, Interrupted, OutputExistsError
from edgeq.modelsource import check_safetensors

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class SignalGuard:
    """While entered (in the main thread, where Python runs signal handlers), SIGNALS raise Interrupted once;
    ``hold()`` defers them over a step that must not be cut in two."""

    def __init__(self) -> None:
        self.previous: dict[int, object] = {}
        self.holding = 0
        self.pending: int | None = None
        self.fired = False  # Interrupted was raised: later signals must not cut the cleanup short
        self.committed = False  # the package is in place: a held signal is delivered after the export, not as a failure

    def _handle(self, signum: int, frame) -> None:
        if self.fired:
            return
        if self.holding:
            self.pending = self.pending or signum
            return
        self.fired = True
        raise Interrupted(signum)

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        self.holding += 1
        try:
            yield
        finally:
            self.holding -= 1
            if not self.holding and self.pending and not self.committed and not self.fired:
                self.fired = True
                raise Interrupted(self.pending)

    def __enter__(self) -> SignalGuard:
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        if self.pending and self.committed:
            signal.raise_signal(self.pending)  # as if it came just after the export: the previous handler decides


def interrupted_message(exc: KeyboardInterrupt, out: Path) -> str:
    name = signal.Signals(getattr(exc, "signum", signal.SIGINT)).name
    return f"export interrupted by {name}: nothing was written to {out}"


# ------------------------------------------------------------------------------------------------------ the lock

def lock_path(dest: Path) -> Path:
    return dest.parent / f".{dest.name}.edgeq-lock"


def _lock(path: Path, dest: Path) -> int:
    """An fd holding flock on ``path``, which still names the locked file: a holder that finished may have
    unlinked it between our open and our flock, and a lock on an unlinked file guards nothing."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise DestinationBusyError(f"{dest} is being written by another edgeq export (pid {pid}, lock {path})",
                                       "wait for that export to finish, or pass -o to write elsewhere") from None
        except BaseException:
            os.close(fd)
            raise
        try:
            here, now = os.fstat(fd), os.stat(path)
            if (here.st_dev, here.st_ino) == (now.st_dev, now.st_ino):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


@contextlib.contextmanager
def claim(dest: Path, guard: SignalGuard) -> Iterator[None]:
    """OUT/<name> is this process's until the block ends; the lock file records its pid for the message others get."""
    path = lock_path(dest)
    fd = None
    try:  # entered before the hold ends: a signal held while locking is raised where the finally removes the lock
        with guard.hold():
            fd = _lock(path, dest)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        if fd is not None:
            with guard.hold():
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)  # while still locked: a waiter that opened it sees it gone and starts over
                os.close(fd)


# ------------------------------------------------------------------------------------------------------ the disk

# Peak use of OUT during an encoder export, as a multiple of the model's parameters in FP32 (the export is FP32
# whatever the checkpoint's dtype): the FP32 ONNX export and its optimized copy (1x each), the quantized model and the
# ORT converter's copy of it, then the package and its zip. Measured: MiniLM 287.6 MB before the zip for 90.9 MB of
# FP32 weights (3.2x), the 0.64 MB test BERT 2.1 MB (3.3x); 4x leaves room for the zip.
ENCODER_FACTOR = 4.0
# A causal LM is written a layer at a time with no FP32 copy (edgeq/decoder/): OUT holds the package, its zip (no
# larger) and at most one closest-fix candidate's package beside them (edgeq/recipes/causal_lm.py). A package is at
# most the embedding table at its precision plus every parameter at 8 bits with its block's FP32 scale and 8-bit zero
# point (9.25 bits per weight: more than any INT4/INT8 plan stores; the Llama-3.2-1B shape's default package is 1.2
# GB of the 2.9 GB this bound gives). A pickle source is first staged as safetensors (its own bytes again).
CAUSAL_LM_PACKAGES = 3
CAUSAL_LM_BYTES_PER_PARAMETER = 9.25 / 8
# ...and causal LMs keep the FP32 reference log-probabilities of every evaluation window on disk (float32).
LOGPROB_BYTES = 4
# ONNX Runtime reports a model write that hit a full disk as "Protobuf serialization failed", without the errno:
# that text counts as a full disk when OUT's disk has less than this left.
NEARLY_FULL = 16 << 20
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
DISK_TEXTS = ("no space left on device", "disk quota exceeded")


def _safetensors_parameters(path: Path) -> tuple[int, int, int]:
    """(parameters, vocabulary rows of the largest 2-D table, its elements) from the header; a shard index counts
    nothing (its shards are weight files too)."""
    if not path.name.endswith(".safetensors"):
        return 0, 0, 0
    shapes = [t["shape"] for t in check_safetensors(path).values()]
    tables = [s for s in shapes if len(s) == 2]
    largest = max(tables, key=math.prod, default=(0, 0))
    return sum(math.prod(s) for s in shapes), max((max(s) for s in tables), default=0), math.prod(largest)


def _gguf_parameters(path: Path) -> tuple[int, int, int]:
    import gguf

    tensors = gguf.GGUFReader(str(path)).tensors
    tables = [t for t in tensors if len(t.shape) == 2]
    return (sum(int(t.n_elements) for t in tensors), max((int(max(t.shape)) for t in tables), default=0),
            max((int(t.n_elements) for t in tables), default=0))


def _pickle_parameters(path: Path) -> tuple[int, int, int]:
    """A pickle (--allow-pickle) is not parsed here: its bytes as FP32 parameters (half the count of a bf16 one,
    which its safetensors conversion in staging then doubles), vocabulary and table unknown."""
    return path.stat().st_size // 4, 0, 0


PARAMETER_COUNTERS = {"safetensors": _safetensors_parameters, "gguf": _gguf_parameters, "pickle": _pickle_parameters}


def parameter_count(source) -> tuple[int, int]:
    """(parameters, vocabulary rows of the largest 2-D table) of ``source`` (a ModelSource), from its weight files'
    headers: no tensor is read."""
    return weight_counts(source)[:2]


def weight_counts(source) -> tuple[int, int, int]:
    """``parameter_count`` and the elements of the largest 2-D table (a causal LM's embedding)."""
    count = PARAMETER_COUNTERS[source.weight_format]
    counts = [count(source.path / name) for name in source.weight_files]
    return (sum(c[0] for c in counts), max((c[1] for c in counts), default=0),
            max((c[2] for c in counts), default=0))


def space_needed(source, profile) -> int:
    """Bytes an export of ``source`` (a ModelSource) with ``profile`` needs free in OUT, at the most."""
    parameters, vocab, table = weight_counts(source)
    if source.kind != "causal-lm":
        return int(ENCODER_FACTOR * 4 * parameters)
    llm = profile.llm  # the largest 2-D table of a causal LM is its embedding: vocabulary x hidden
    logprobs = llm.eval_windows * llm.window_tokens * vocab * LOGPROB_BYTES
    # an 8-bit table: codes, an FP32 scale and a zero point per block (the smallest block doubles the overhead)
    table_bytes = {"fp16": 2, "int8": 1 + 5 / 16}.get(llm.embedding_precision, 4)
    package = table * table_bytes + parameters * CAUSAL_LM_BYTES_PER_PARAMETER
    staged_pickle = 4 * parameters if source.weight_format == "pickle" else 0
    return int(CAUSAL_LM_PACKAGES * package) + logprobs + staged_pickle


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def check_space(out: Path, needed: int) -> None:
    free = shutil.disk_usage(out).free
    if free < needed:
        raise DiskFullError(f"not enough free space in {out}: {_mb(free)} free ({free} bytes), the export needs "
                            f"about {_mb(needed)} ({needed} bytes) for its working copies and the package",
                            "free space on that disk, or pass -o a folder on a disk with more room")


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def disk_full(exc: BaseException, out: Path, needed: int) -> DiskFullError | None:
    """The DiskFullError ``exc`` really is, or None. Called before the staging folder is removed: the disk is still
    as full as when the write failed."""
    chain = list(_chain(exc))
    text = " ".join(str(e) for e in chain).lower()
    full = (any(isinstance(e, OSError) and e.errno in DISK_ERRNOS for e in chain)
            or any(t in text for t in DISK_TEXTS))
    if not full and "serialization failed" in text:
        with contextlib.suppress(OSError):
            full = shutil.disk_usage(out).free < NEARLY_FULL
    if not full:
        return None
    errnos = [e for e in chain if isinstance(e, OSError) and e.errno in DISK_ERRNOS]  # the plainest words first
    lines = [line.strip() for e in errnos + chain for line in str(e).splitlines() if line.strip()]
    what = next((line for line in lines if any(t in line.lower() for t in (*DISK_TEXTS, "serialization failed"))),
                lines[0] if lines else type(exc).__name__)[:200]
    return DiskFullError(f"the disk holding {out} is full ({what}); the export stopped and nothing was written "
                         f"to {out}",
                         f"free space on that disk (this export needs about {_mb(needed)}), or pass -o a folder on a "
                         "disk with more room")


# ------------------------------------------------------------------------------------------------------ the zip

ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # the earliest a zip can record: no build time in the bytes


def zip_path(dest: Path) -> Path:
    """<package>/<package>.zip: inside the folder, so the folder and its zip appear in one rename. Not with_suffix:
    'bge-small-en-v1.5-android-arm64' has a dot that is not a suffix."""
    return dest / f"{dest.name}.zip"


def write_zip(folder: Path) -> Path:
    """Zip every file of ``folder`` (not the zip itself) as <folder name>/<file>, byte-reproducibly: sorted members,
    fixed time and mode, deflate at zlib's default level (6), no directory entries."""
    archive = zip_path(folder)
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p != archive)
    with zipfile.ZipFile(archive, "w") as z:
        for name in names:
            info = zipfile.ZipInfo(f"{folder.name}/{name}", date_time=ZIP_DATE)
            info.create_system = 3  # unix, so external_attr is read as a mode everywhere
            info.external_attr = 0o100644 << 16  # regular file, rw-r--r--
            info.compress_type = zipfile.ZIP_DEFLATED
            info.file_size = (folder / name).stat().st_size  # lets zipfile choose zip64 up front for big files
            with open(folder / name, "rb") as src, z.open(info, "w") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    return archive


# ------------------------------------------------------------------------------------------------------ children

_PR_SET_PDEATHSIG = 1
# Looked up here, not in the forked child: dlopen there could wait forever on a loader lock another thread held.
_PRCTL = ctypes.CDLL(None).prctl if sys.platform.startswith("linux") else None


def die_with_parent() -> None:
    """preexec_fn for child processes: the kernel SIGKILLs the child when edgeq dies (even by SIGKILL), so no
    converter or device worker outlives it. Linux only; elsewhere a no-op."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGKILL)


# ------------------------------------------------------------------------------------------------------ staging

@dataclass
class Staging:
    root: Path  # OUT/.edgeq-XXXXXXXX, removed at the end whatever happens
    dest: Path  # OUT/<name>
    force: bool
    guard: SignalGuard

    @property
    def folder(self) -> Path:
        """The package is built here, then renamed to ``dest``."""
        return self.root / self.dest.name

    @property
    def work(self) -> Path:
        return self.root / "work"

    def place(self) -> None:
        """Rename the built folder (with its zip inside) to OUT/<name>. An old package is first renamed aside into
        the staging folder and goes with it. Two renames, not renameat2(RENAME_EXCHANGE): that is Linux-only and
        not on every file system; with signals held between the two, OUT/<name> is missing for two syscalls, and
        only a SIGKILL just then leaves it so, with the old package whole in the staging folder."""
        with self.guard.hold():
            aside = self.root / "replaced"
            aside.mkdir()
            legacy_zip = self.dest.parent / f"{self.dest.name}.zip"  # where edgeq before 13 wrote the zip
            olds = (self.dest, legacy_zip) if self.force else (self.dest,)
            moved = [old for old in olds if old.exists() or old.is_symlink()]
            try:
                for old in moved:
                    os.rename(old, aside / old.name)
                os.rename(self.folder, self.dest)
            except OSError:  # e.g. no room for a directory entry: put the old package back before the cleanup
                for old in moved:
                    if (aside / old.name).exists() or (aside / old.name).is_symlink():
                        os.rename(aside / old.name, old)
                raise
            self.guard.committed = True


@contextlib.contextmanager
def staged(dest: Path, force: bool, needed: int) -> Iterator[Staging]:
    """OUT claimed, its space checked, a staging folder to build in; on leaving, nothing but a placed package."""
    out = dest.parent
    with SignalGuard() as guard:
        try:
            out.mkdir(parents=True, exist_ok=True)
            with claim(dest, guard):
                if (dest.exists() or dest.is_symlink()) and not force:  # the check before the lock may be stale
                    raise OutputExistsError(f"{dest} already exists",
                                            "pass --force to replace it, or -o to write elsewhere")
                check_space(out, needed)
                stage = None
                try:  # entered before the hold ends, as in claim: a held signal still gets the folder removed
                    with guard.hold():
                        stage = Staging(Path(tempfile.mkdtemp(prefix=".edgeq-", dir=out)), dest, force, guard)
                    stage.work.mkdir()
                    yield stage
                except Exception as exc:
                    full = disk_full(exc, out, needed)
                    if full is None:
                        raise
                    raise full from exc
                finally:
                    if stage is not None:
                        with guard.hold():
                            shutil.rmtree(stage.root, ignore_errors=True)
        except KeyboardInterrupt as exc:
            raise Interrupted(getattr(exc, "signum", signal.SIGINT), interrupted_message(exc, out)) from None
        except OSError as exc:  # making OUT, the lock, the staging folder
            full = disk_full(exc, out, needed)
            if full is None:
                raise
            raise full from exc
