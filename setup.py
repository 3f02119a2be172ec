"""Which packages the wheel holds; every other setting is in pyproject.toml.

export_profiles/ and calibration_data/ stay at the top of the repository and install as the subpackages
edgeq.export_profiles and edgeq.calibration_data, so a wheel carries them and an editable install reads the
checkout's files. pyproject.toml's packages.find cannot add a package mapped from another folder to the ones it
finds, hence this file.
"""

from setuptools import find_packages, setup

BUNDLED = {"edgeq.export_profiles": "export_profiles", "edgeq.calibration_data": "calibration_data"}

setup(packages=find_packages(include=["edgeq", "edgeq.*"]) + list(BUNDLED), package_dir=BUNDLED)
