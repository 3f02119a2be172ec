"""Interrupts, races and full disks on real `edgeq export` runs of the tiny BERT: whatever happens, OUT holds the
finished package or nothing (no staging folder, no lock file), and the user gets one clear `error:` line."""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from edgeq.errors import DestinationBusyError, DiskFullError, OutputExistsError
from edgeq.modelsource import inspect_model_dir
from edgeq.pipeline import ExportRequest, export_package
from edgeq.profiles import load_profile
from edgeq.stages.verify import verify
from edgeq.staging import (ENCODER_FACTOR, SignalGuard, check_space, claim, die_with_parent, lock_path, space_needed,
                           staged, write_zip, zip_path)

ROOT = Path(__file__).resolve().parents[2]
PACKAGE_NAME = "tiny-bert-android-arm64"
EXPORT_TIMEOUT = 300


# ---------------------------------------------------------------------------------------------------- helpers

def start_export(model: Path, out: Path, *extra: str) -> subprocess.Popen:
    """A real `edgeq export` in its own process (this checkout's edgeq, this interpreter)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-c", "import sys; from edgeq.cli import main; sys.exit(main())", "export", str(model),
           "--profile", "android-arm64", "-o", str(out), "--samples", "8", "-q", *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_until(ready, proc: subprocess.Popen, what: str, timeout: float = EXPORT_TIMEOUT):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = ready()
        if found:
            return found
        if proc.poll() is not None:
            pytest.fail(f"export ended (exit {proc.returncode}) before {what}: {proc.stderr.read()}")
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"no {what} after {timeout} s")


def staging_folder(out: Path) -> Path | None:
    found = [p for p in out.glob(".edgeq-*") if p.is_dir()] if out.is_dir() else []
    return found[0] if found else None


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    stdout, stderr = proc.communicate(timeout=EXPORT_TIMEOUT)
    return proc.returncode, stdout, stderr


def error_lines(stderr: str) -> tuple[list[str], list[str]]:
    lines = stderr.splitlines()
    return ([ln[len("error: "):] for ln in lines if ln.startswith("error: ")],
            [ln[len("hint: "):] for ln in lines if ln.startswith("hint: ")])


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(c) for c in path.read_text().split()] if path.exists() else []


def alive(pid: int) -> bool:
    """Running, not a zombie waiting to be reaped."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.fixture
def small_disk(tmp_path):
    """Mount a tmpfs of the given size (needs root; skipped with the reason elsewhere); unmounted afterwards."""
    mounted = []

    def mount(size: str) -> Path:
        if os.geteuid() != 0 or shutil.which("mount") is None:
            pytest.skip("a size-limited file system is made with 'mount -t tmpfs', which needs root")
        where = tmp_path / f"disk{len(mounted)}"
        where.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True,
                           text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(disk: Path) -> None:
    """Write zeros into ``disk`` until it is full."""
    fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT)  # unbuffered: no flush left to fail on close
    try:
        while os.write(fd, b"\0" * (64 << 10)):
            pass
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)


@pytest.fixture(scope="module")
def package(tiny_bert_dir, tmp_path_factory) -> Path:
    """One in-process export shared by the module; tests work on copies."""
    out = tmp_path_factory.mktemp("staging-out")
    return export_package(ExportRequest(tiny_bert_dir, "android-arm64", out_dir=out, samples=8)).path


# ---------------------------------------------------------------------------------------------------- signals

@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
@pytest.mark.encoders
def test_signal_during_export_removes_the_staging_folder_and_the_lock(tiny_bert_dir, tmp_path, signum):
    out = tmp_path / "out"
    proc = start_export(tiny_bert_dir, out)
    wait_until(lambda: staging_folder(out), proc, "a staging folder")
    assert lock_path(out / PACKAGE_NAME).is_file()
    proc.send_signal(signum)
    code, stdout, stderr = finish(proc)
    assert code == 128 + signum, stderr
    assert "Traceback" not in stderr
    errors, hints = error_lines(stderr)
    assert errors == [f"export interrupted by {signal.Signals(signum).name}: nothing was written to {out}"], stderr
    assert stdout == ""
    assert list(out.iterdir()) == []


@pytest.mark.slow  # a whole export up to its packaging stage: ~15 s alone, over 30 s on a busy machine
def test_sigterm_during_the_ort_conversion_leaves_no_converter_running(tiny_bert_dir, tmp_path):
    out = tmp_path / "out"
    proc = start_export(tiny_bert_dir, out)
    stage = wait_until(lambda: staging_folder(out), proc, "a staging folder")
    # anywhere in the staging folder: the encoder recipe converts each promotion count under work/<count>/ (issue 17)
    wait_until(lambda: list(stage.rglob(".*.ortconv-*")) and children(proc.pid), proc,
               "the ORT-format converter")
    converters = children(proc.pid)
    proc.send_signal(signal.SIGTERM)
    code, _, stderr = finish(proc)
    assert code == 128 + signal.SIGTERM, stderr
    deadline = time.monotonic() + 10
    while any(alive(c) for c in converters) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(alive(c) for c in converters), converters
    assert list(out.iterdir()) == []


def test_a_child_started_with_die_with_parent_dies_when_its_parent_is_killed(tmp_path):
    """SIGKILL runs no cleanup in edgeq, so the kernel must end the converter/worker itself (PR_SET_PDEATHSIG)."""
    parent = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, sys, time; from edgeq.staging import die_with_parent; "
         "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], preexec_fn=die_with_parent); "
         "print(c.pid, flush=True); time.sleep(120)"],
        env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    assert alive(child)
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 10
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(child)
    assert die_with_parent() is None  # and in this process it is a harmless call


# ---------------------------------------------------------------------------------------------------- races

@pytest.mark.slow  # a whole export: ~20 s alone, over 30 s on a busy machine
def test_two_exports_into_one_out_exactly_one_succeeds(tiny_bert_dir, tmp_path):
    out = tmp_path / "out"
    first = start_export(tiny_bert_dir, out)
    wait_until(lambda: staging_folder(out), first, "the first export at work")
    second = start_export(tiny_bert_dir, out)
    code2, stdout2, stderr2 = finish(second)
    code1, stdout1, stderr1 = finish(first)
    assert code1 == 0, stderr1
    assert stdout1.splitlines()[0] == f"wrote {out / PACKAGE_NAME}"
    assert code2 == 2 and stdout2 == "" and "Traceback" not in stderr2, stderr2
    errors, hints = error_lines(stderr2)
    assert errors == [f"{out / PACKAGE_NAME} is being written by another edgeq export (pid {first.pid}, "
                      f"lock {lock_path(out / PACKAGE_NAME)})"], stderr2
    assert hints == ["wait for that export to finish, or pass -o to write elsewhere"]
    assert sorted(p.name for p in out.iterdir()) == [PACKAGE_NAME]
    assert verify(out / PACKAGE_NAME).ok


def test_claim_refuses_a_held_destination_and_takes_over_a_dead_ones_lock(tmp_path):
    dest = tmp_path / PACKAGE_NAME
    lock_path(dest).write_text("999999999\n")  # left by a SIGKILLed export: the file is there, its flock is not
    with SignalGuard() as guard, claim(dest, guard):
        assert lock_path(dest).read_text() == f"{os.getpid()}\n"
        with pytest.raises(DestinationBusyError, match=rf"being written by another edgeq export \(pid {os.getpid()},"):
            with claim(dest, guard):
                pass
    assert list(tmp_path.iterdir()) == []


def test_claim_starts_over_when_the_lock_file_is_unlinked_between_open_and_flock(tmp_path, monkeypatch):
    """The race a finishing export leaves: it unlinks its lock file just after we opened it, so our flock lands on
    an orphan inode that guards nothing. The claim must notice and lock the file the path names now."""
    import fcntl

    dest = tmp_path / PACKAGE_NAME
    lock_path(dest).write_text("1\n")
    real_flock, orphans = fcntl.flock, []

    def flock_after_the_holder_finished(fd, op):
        if not orphans:  # the other export finishes now: unlinks its file; a third one creates a new one
            orphans.append(os.fstat(fd).st_ino)
            lock_path(dest).unlink()
            lock_path(dest).write_text("")
        return real_flock(fd, op)

    monkeypatch.setattr(fcntl, "flock", flock_after_the_holder_finished)
    with SignalGuard() as guard, claim(dest, guard):
        assert lock_path(dest).stat().st_ino != orphans[0]
        assert lock_path(dest).read_text() == f"{os.getpid()}\n"
    assert list(tmp_path.iterdir()) == []


def test_destination_made_while_waiting_for_the_lock_is_refused_without_force(tmp_path):
    """check_inputs looks before the lock; another export may have finished since. staged() looks again."""
    dest = tmp_path / "out" / PACKAGE_NAME
    dest.mkdir(parents=True)
    with pytest.raises(OutputExistsError, match="already exists") as err:
        with staged(dest, force=False, needed=0):
            pytest.fail("must not get here")
    assert "--force" in err.value.hint and err.value.exit_code == 2
    assert sorted(p.name for p in dest.parent.iterdir()) == [PACKAGE_NAME]


@pytest.mark.encoders
def test_export_into_a_destination_claimed_by_another_process_exits_2_at_once(tiny_bert_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with SignalGuard() as guard, claim(out / PACKAGE_NAME, guard):  # this test process is "the other export"
        code, stdout, stderr = finish(start_export(tiny_bert_dir, out))
        assert sorted(p.name for p in out.iterdir()) == [lock_path(out / PACKAGE_NAME).name]
    assert code == 2 and stdout == "" and "Traceback" not in stderr, stderr
    errors, hints = error_lines(stderr)
    assert errors == [f"{out / PACKAGE_NAME} is being written by another edgeq export (pid {os.getpid()}, "
                      f"lock {lock_path(out / PACKAGE_NAME)})"], stderr
    assert hints == ["wait for that export to finish, or pass -o to write elsewhere"]
    assert list(out.iterdir()) == []


@pytest.mark.encoders
def test_second_export_into_an_existing_package_without_force_exits_2(package, tiny_bert_dir, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(package, out / PACKAGE_NAME)
    before = {p.name: p.read_bytes() for p in sorted((out / PACKAGE_NAME).iterdir())}
    code, stdout, stderr = finish(start_export(tiny_bert_dir, out))
    assert code == 2 and stdout == "" and "Traceback" not in stderr, stderr
    errors, hints = error_lines(stderr)
    assert errors == [f"{out / PACKAGE_NAME} already exists"]
    assert hints == ["pass --force to replace it, or -o to write elsewhere"]
    assert {p.name: p.read_bytes() for p in sorted((out / PACKAGE_NAME).iterdir())} == before
    assert sorted(p.name for p in out.iterdir()) == [PACKAGE_NAME]


# ---------------------------------------------------------------------------------------------------- disk

def test_space_needed_is_the_factor_times_the_fp32_parameters(tiny_bert_dir):
    from safetensors import safe_open

    with safe_open(str(tiny_bert_dir / "model.safetensors"), "np") as f:
        parameters = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    needed = space_needed(inspect_model_dir(tiny_bert_dir), load_profile("android-arm64"))
    assert needed == int(ENCODER_FACTOR * 4 * parameters)
    # the FP32 weights are stored as FP32 here: the estimate is the factor times the file, give or take its header
    assert abs(needed / (tiny_bert_dir / "model.safetensors").stat().st_size - ENCODER_FACTOR) < 0.05


def test_check_space_names_free_and_needed_bytes(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    check_space(tmp_path, free // 2)
    pattern = (rf"not enough free space in {re.escape(str(tmp_path))}: [\d.]+ MB free \(\d+ bytes\), the export "
               rf"needs about [\d.]+ MB \({free * 2} bytes\)")
    with pytest.raises(DiskFullError, match=pattern) as err:
        check_space(tmp_path, free * 2)
    assert err.value.hint == "free space on that disk, or pass -o a folder on a disk with more room"
    assert err.value.exit_code == 2


@pytest.mark.encoders
def test_export_onto_a_too_small_disk_is_refused_before_any_work(tiny_bert_dir, small_disk):
    out = small_disk("1m") / "out"
    code, stdout, stderr = finish(start_export(tiny_bert_dir, out))
    assert code == 2 and stdout == "" and "Traceback" not in stderr, stderr
    errors, hints = error_lines(stderr)
    assert len(errors) == 1 and errors[0].startswith(f"not enough free space in {out}: "), stderr
    assert hints == ["free space on that disk, or pass -o a folder on a disk with more room"]
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("when", ["staging", "fp32-export"])
@pytest.mark.encoders
def test_disk_filling_up_during_the_export_is_one_clear_error(tiny_bert_dir, small_disk, when):
    """A real full disk: the tmpfs has room for the up-front check, then the test fills it while the export runs
    (as the staging folder appears: optimum's write fails, which today blames the model; or once the FP32 export is
    written: ONNX Runtime's "Protobuf serialization failed" or onnx.save's ENOSPC)."""
    disk = small_disk("8m")
    out = disk / "out"
    proc = start_export(tiny_bert_dir, out)
    if when == "staging":
        wait_until(lambda: staging_folder(out), proc, "a staging folder")
    else:
        wait_until(lambda: (s := staging_folder(out)) and (s / "work" / "export" / "model.onnx").is_file(), proc,
                   "the FP32 export")
    fill(disk)
    code, stdout, stderr = finish(proc)
    assert code == 2 and stdout == "" and "Traceback" not in stderr, stderr
    errors, hints = error_lines(stderr)
    assert len(errors) == 1 and errors[0].startswith(f"the disk holding {out} is full ("), stderr
    assert errors[0].endswith(f"the export stopped and nothing was written to {out}")
    assert "re-download" not in stderr
    assert len(hints) == 1 and hints[0].startswith("free space on that disk (this export needs about ")
    assert list(out.iterdir()) == []


# ---------------------------------------------------------------------------------------------------- zip

def test_zip_is_byte_identical_whatever_the_files_mtimes(tmp_path):
    folder = tmp_path / "a" / PACKAGE_NAME
    folder.mkdir(parents=True)
    for name, data in (("model.ort", os.urandom(5000)), ("manifest.json", b"{}\n"), ("vocab.txt", b"a\nb\n")):
        (folder / name).write_bytes(data)
    first = write_zip(folder).read_bytes()
    copy = Path(shutil.copytree(folder, tmp_path / "b" / PACKAGE_NAME, copy_function=shutil.copyfile))
    zip_path(copy).unlink()
    for i, p in enumerate(sorted(copy.iterdir())):
        os.utime(p, (1_700_000_000 + i * 977, 1_700_000_000 + i * 977))
        p.chmod(0o600)
    assert write_zip(copy).read_bytes() == first
    with zipfile.ZipFile(zip_path(copy)) as z:
        infos = z.infolist()
    assert [i.filename for i in infos] == [f"{PACKAGE_NAME}/{n}" for n in ("manifest.json", "model.ort", "vocab.txt")]
    assert {(i.date_time, i.external_attr >> 16, i.compress_type) for i in infos} == {
        ((1980, 1, 1, 0, 0, 0), 0o100644, zipfile.ZIP_DEFLATED)}


@pytest.mark.encoders
def test_package_zip_is_inside_the_folder_and_verified(package):
    assert sorted(p.name for p in package.parent.iterdir()) == [PACKAGE_NAME]
    manifest = json.loads((package / "manifest.json").read_text())
    assert f"{PACKAGE_NAME}.zip" not in manifest["files"]
    with zipfile.ZipFile(zip_path(package)) as z:
        assert z.namelist() == sorted(f"{PACKAGE_NAME}/{n}" for n in [*manifest["files"], "manifest.json"])
    checks = {name: (ok, detail) for name, ok, detail in verify(package).checks}
    detail = f"{len(manifest['files']) + 1} files, each byte for byte the folder's"
    assert checks[f"zip {PACKAGE_NAME}.zip"] == (True, detail)


def _rezip(archive: Path, edit) -> None:
    with zipfile.ZipFile(archive) as z:
        members = {n: z.read(n) for n in z.namelist()}
    edit(members)
    with zipfile.ZipFile(archive, "w") as z:
        for n, data in members.items():
            z.writestr(n, data)


@pytest.mark.parametrize("edit, detail", [
    (lambda m: m.update({f"{PACKAGE_NAME}/vocab.txt": b"tampered\n"}), "differs from the folder's vocab.txt"),
    (lambda m: m.update({f"{PACKAGE_NAME}/extra.py": b"print(1)\n"}), "members differ from the package: extra.py"),
    (lambda m: m.pop(f"{PACKAGE_NAME}/manifest.json"), "members differ from the package: manifest.json"),
])
@pytest.mark.encoders
def test_verify_fails_a_zip_that_differs_from_the_folder(package, tmp_path, edit, detail):
    copy = Path(shutil.copytree(package, tmp_path / PACKAGE_NAME))
    _rezip(zip_path(copy), edit)
    bad = {name: d for name, ok, d in verify(copy).checks if not ok}
    assert bad == {f"zip {PACKAGE_NAME}.zip": detail}


@pytest.mark.encoders
def test_verify_fails_a_zip_that_is_not_a_zip(package, tmp_path):
    copy = Path(shutil.copytree(package, tmp_path / PACKAGE_NAME))
    zip_path(copy).write_bytes(b"not a zip")
    bad = {name: d for name, ok, d in verify(copy).checks if not ok}
    assert list(bad) == [f"zip {PACKAGE_NAME}.zip"] and bad[f"zip {PACKAGE_NAME}.zip"].startswith("not a readable zip")
