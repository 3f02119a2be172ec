"""edgeq.resources: the profiles and the text splits resolve through the package, and the wheel carries them.

The wheel test builds from a copy of the project's files (not in the checkout: setuptools' in-tree build/ folder
keeps files of earlier builds) with the installed setuptools, a few seconds. `make wheel-check` installs such a wheel
into a fresh venv and exports from it.
"""

from __future__ import annotations

import email.parser
import os
import shutil
import re
import subprocess
import sys
import zipfile
from importlib.resources import files
from pathlib import Path
from typing import NamedTuple

import pytest

from edgeq.errors import EdgeqError
from edgeq.profiles import PROFILES_DIR, known_profiles, load_profile
from edgeq.resources import CALIBRATION_DATA_DIR, bundled_dir
from edgeq.textdata import CALIBRATION_FILE, EVALUATION_FILE, load_texts

ROOT = Path(__file__).resolve().parent.parent
# What the wheel is built from (everything setup.py and pyproject.toml read).
PROJECT_FILES = ("pyproject.toml", "setup.py", "README.md")
PROJECT_DIRS = ("edgeq", "export_profiles", "calibration_data")


def test_profiles_resolve_through_the_package():
    assert PROFILES_DIR == files("edgeq.export_profiles")
    names = sorted(p.stem for p in ROOT.joinpath("export_profiles").glob("*.toml"))
    assert names and sorted(known_profiles()) == names
    profile = load_profile("android-arm64")
    assert Path(profile.source) == PROFILES_DIR / "android-arm64.toml"


def test_text_splits_resolve_through_the_package():
    assert CALIBRATION_DATA_DIR == files("edgeq.calibration_data")
    assert (CALIBRATION_FILE.parent, EVALUATION_FILE.parent) == (CALIBRATION_DATA_DIR, CALIBRATION_DATA_DIR)
    # calibration_data/README.md gives the sizes: 400 calibration and 320 evaluation records
    assert (len(load_texts(CALIBRATION_FILE).texts), len(load_texts(EVALUATION_FILE).texts)) == (400, 320)


def test_bundled_dir_inside_a_zip_is_refused_with_the_fix(tmp_path, monkeypatch):
    archive = tmp_path / "zipped.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("zipped_profiles/__init__.py", "")
        z.writestr("zipped_profiles/android-arm64.toml", "")
    monkeypatch.syspath_prepend(str(archive))
    with pytest.raises(EdgeqError, match=r"\(zipped_profiles\) are not in a folder on disk") as err:
        bundled_dir("zipped_profiles")
    assert "install edgeq with pip" in err.value.hint
    sys.modules.pop("zipped_profiles", None)


class Built(NamedTuple):
    wheel: zipfile.ZipFile
    log: str  # pip's and setuptools' output, warnings included


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Built:
    """The wheel built from a copy of the project."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in PROJECT_FILES:
        shutil.copy2(ROOT / name, src / name)
    for name in PROJECT_DIRS:
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    run = subprocess.run([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation",
                          "--wheel-dir", str(tmp / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (wheel,) = (tmp / "dist").glob("edgeq-*.whl")
    return Built(zipfile.ZipFile(wheel), run.stdout + run.stderr)


def test_wheel_holds_every_profile_and_text_split_as_package_data(built):
    names = set(built.wheel.namelist())
    bundled = ([f"edgeq/export_profiles/{p.name}" for p in ROOT.joinpath("export_profiles").glob("*.toml")]
               + [f"edgeq/calibration_data/{p.name}" for p in ROOT.joinpath("calibration_data").glob("*.jsonl")])
    assert len(bundled) >= 7 and not set(bundled) - names  # 5 profiles and 2 text splits today
    modules = {p.relative_to(ROOT).as_posix() for p in ROOT.joinpath("edgeq").rglob("*.py") if "__pycache__" not in p.parts}
    assert not modules - names, "setup.py's find_packages missed these modules (a folder without __init__.py?)"
    top = {n.split("/")[0] for n in names} - {"edgeq"}
    assert len(top) == 1 and top.pop().endswith(".dist-info"), f"the wheel installs more than edgeq: {sorted(top)}"


def test_wheel_metadata_asks_for_ranges_and_names_its_license(built):
    (metadata,) = [n for n in built.wheel.namelist() if n.endswith(".dist-info/METADATA")]
    meta = email.parser.Parser().parsestr(built.wheel.read(metadata).decode())
    torch = [r for r in meta.get_all("Requires-Dist") if r.startswith("torch")]
    assert torch == ["torch<3,>=2.6"]  # this machine's CPU build is pinned by constraints.txt, not the package
    assert meta["Requires-Python"] == "<3.15,>=3.11"
    assert meta["License-Expression"] == "Apache-2.0"
    assert "SetuptoolsDeprecationWarning" not in built.log
    # issue 17: `python -m build` warned twice of the license table; nothing in the build is deprecated now, and
    # the only warnings left are setuptools' notes that PYTHONDONTWRITEBYTECODE skips byte-compiling
    assert not re.search(r"(?i)deprecat", built.log), built.log[-3000:]
    warnings = [ln for ln in built.log.splitlines() if re.search(r"(?i)\bwarn", ln)]
    assert all("byte-compiling is disabled" in ln for ln in warnings), warnings
    assert "running bdist_wheel" in built.log  # the log is setuptools' (pip -v), not pip's summary alone


def test_unpacked_wheel_lists_and_loads_its_own_profiles_outside_the_checkout(built, tmp_path):
    site = tmp_path / "site"  # a pure-Python wheel installs by unpacking it
    built.wheel.extractall(site)
    code = ("import edgeq, edgeq.textdata as t; from edgeq.profiles import PROFILES_DIR, load_profile; "
            "print(edgeq.__file__, PROFILES_DIR, t.CALIBRATION_FILE, load_profile('android-qnn-htp').source)")
    env = {**os.environ, "PYTHONPATH": str(site)}
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    for where in run.stdout.split():
        assert Path(where).is_relative_to(site / "edgeq"), where
    cli = "import sys; from edgeq.cli import main; sys.argv[1:] = ['profiles', '--names']; main()"
    listing = subprocess.run([sys.executable, "-c", cli], cwd=tmp_path, env=env, capture_output=True, text=True,
                             timeout=120)
    assert listing.returncode == 0, listing.stderr[-3000:]
    assert "android-arm64" in listing.stdout.split()
