"""Where the files that ship inside edgeq are: the device profiles and the calibration/evaluation text.

They are found through importlib.resources as the packages ``edgeq.export_profiles`` and ``edgeq.calibration_data``
(setup.py maps the repository's top-level folders to them), so a wheel installed anywhere finds its own copies and
an editable install finds the checkout's.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from edgeq.errors import EdgeqError


def bundled_dir(package: str) -> Path:
    """The folder of a data package as a real path (profiles and text files are hashed and globbed by path)."""
    folder = files(package)
    if not isinstance(folder, Path):
        raise EdgeqError(f"edgeq's bundled files ({package}) are not in a folder on disk but in {folder}",
                         "install edgeq with pip (which unpacks the wheel) rather than importing it from a zip")
    return folder


PROFILES_DIR = bundled_dir("edgeq.export_profiles")
CALIBRATION_DATA_DIR = bundled_dir("edgeq.calibration_data")
