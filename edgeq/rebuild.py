"""``edgeq verify PACKAGE --rebuild``: export the package again from the inputs its manifest records and compare
every file's bytes with the package's.

The manifest names its inputs without local paths (source: folder name and file hashes; profile, calibration and
evaluation files: name and sha256), so the user points at the source folder (``--model``) and, for files edgeq does
not bundle, at the profile (``--profile``) and calibration text (``--calibration``). Every input is checked against
the manifest's hashes before minutes of export: one that cannot be found or differs is a user error (exit 2) that
names it; a rebuilt file that differs is a failed verification (exit 1).
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from edgeq.errors import CalibrationDataError, ModelFolderError, ProfileError, UserInputError, VerificationError
from edgeq.manifest import Manifest, read_manifest, tool_versions
from edgeq.manifest_schema import CalibrationRecord, ProfileRecord
from edgeq.modelsource import check_recorded_source, sha256_file
from edgeq.progress import QUIET, Progress
from edgeq.textdata import CALIBRATION_FILE, EVALUATION_FILE

# What the manifest's profile "overrides" hold besides --set keys: ExportRequest's own fields.
_REQUEST_OVERRIDES = ("calibration_samples", "calibration_seq_len", "package_name")


@dataclass(frozen=True)
class FileComparison:
    name: str
    packaged: str | None  # sha256 in the package, None if the package lacks the file
    rebuilt: str | None  # sha256 in the rebuild, None if the rebuild lacks the file

    @property
    def same(self) -> bool:
        return self.packaged == self.rebuilt

    def line(self) -> str:
        if self.same:
            return f"same {self.name}: sha256 {self.packaged[:12]}"
        if self.rebuilt is None:
            return f"DIFF {self.name}: in the package, not in the rebuild"
        if self.packaged is None:
            return f"DIFF {self.name}: in the rebuild, not in the package"
        return f"DIFF {self.name}: package sha256 {self.packaged[:12]}, rebuild {self.rebuilt[:12]}"


def rebuild_request(package: Path, manifest: Manifest, model_dir: Path | None, calibration: Path | None,
                    profile: Path | None, out_dir: Path):
    """The ExportRequest that made the package, from its manifest; raises UserInputError naming the first recorded
    input that cannot be found or whose hash differs."""
    from edgeq.pipeline import ExportRequest

    _check_tools(manifest)
    src, recorded_profile = manifest.source, manifest.profile
    if model_dir is None:
        if src.path is None:
            raise ModelFolderError(f"{package}'s manifest names its source ({src.name}) by file hashes only",
                                   "pass the source model folder with --model DIR")
        model_dir = Path(src.path)  # a package written before manifests dropped local paths
    check_recorded_source(Path(model_dir), src)
    overrides = dict(recorded_profile.overrides or {})
    settings = tuple((k, v) for k, v in overrides.items() if k not in _REQUEST_OVERRIDES)
    _check_evaluation(manifest)
    return ExportRequest(Path(model_dir), _profile_arg(recorded_profile, profile), out_dir,
                         calibration=_calibration_file(manifest.calibration, calibration),
                         samples=overrides.get("calibration_samples"), seq_len=overrides.get("calibration_seq_len"),
                         gguf_file=src.gguf_file or None, settings=settings, allow_pickle=src.allow_pickle is True,
                         name=overrides.get("package_name"))


def rebuild(package: Path, model_dir: Path | None = None, calibration: Path | None = None,
            profile: Path | None = None, progress: Progress = QUIET) -> list[FileComparison]:
    """Export again into a temporary folder outside the package; one comparison per file of either folder."""
    from edgeq.pipeline import export_package

    package = Path(package)
    manifest = read_manifest(package)
    tmp = Path(tempfile.mkdtemp(prefix="edgeq-rebuild-"))
    try:
        if package.resolve() in (tmp.resolve(), *tmp.resolve().parents):
            raise UserInputError(f"the temporary folder {tmp} is inside the package", "set TMPDIR elsewhere")
        req = rebuild_request(package, manifest, model_dir, calibration, profile, tmp / "out")
        rebuilt = export_package(req, progress)
        return compare_folders(package, rebuilt.path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def compare_folders(package: Path, rebuilt: Path) -> list[FileComparison]:
    """Every file of both folders (the manifest too), by path inside the folder."""
    a, b = _hashes(package), _hashes(rebuilt)
    return [FileComparison(name, a.get(name), b.get(name)) for name in sorted(set(a) | set(b))]


def _hashes(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.is_symlink()}


def check_rebuild(package: Path, model_dir: Path | None, calibration: Path | None, profile: Path | None,
                  echo, progress: Progress = QUIET) -> None:
    """Rebuild, print one line per file, raise VerificationError if any differs."""
    results = rebuild(package, model_dir, calibration, profile, progress)
    for r in results:
        echo(r.line())
    differ = [r.name for r in results if not r.same]
    if differ:
        raise VerificationError(f"the rebuild of {package} differs in {len(differ)} of {len(results)} files: "
                                f"{', '.join(differ)}",
                                "the package was not made from these inputs by this edgeq, or a step is not "
                                "reproducible; do not trust its provenance")
    echo(f"rebuilt {package}: all {len(results)} files byte-identical")


def _check_tools(manifest: Manifest) -> None:
    recorded = manifest.tools or {}
    installed = tool_versions()
    differ = [f"{t} {recorded[t]} (installed: {installed[t]})" for t in installed
              if t in recorded and recorded[t] != installed[t]]
    if differ:
        raise UserInputError(f"the package was made with other tool versions: {'; '.join(differ)}",
                             "rebuild with the recorded versions installed (pip install NAME==VERSION)")


def _profile_arg(recorded: ProfileRecord, profile: Path | None) -> str:
    """What ExportRequest.profile takes: the passed file, or the bundled profile of the recorded name and hash."""
    from edgeq.profiles import known_profiles

    if profile is not None:
        if not Path(profile).is_file():
            raise ProfileError(f"profile file {profile} does not exist", "pass the profile file the package was made with")
        if sha256_file(Path(profile)) != recorded.sha256:
            raise ProfileError(f"profile file {profile} differs from the one the package was made with "
                               f"({recorded.file}, sha256 {str(recorded.sha256)[:12]})",
                               "pass the profile file the package was made with")
        return str(profile)
    bundled = known_profiles().get(Path(str(recorded.file)).stem)
    if bundled is None or bundled.name != recorded.file:
        raise ProfileError(f"the package's profile file {recorded.file} is not one edgeq bundles",
                           "pass it with --profile FILE")
    if sha256_file(bundled) != recorded.sha256:
        raise ProfileError(f"the bundled profile {bundled.name} changed since the package was made",
                           "pass the profile file the package was made with (--profile FILE)")
    return str(bundled)


def _calibration_file(recorded: CalibrationRecord | None, passed: Path | None) -> Path:
    name, digest = (recorded.file, recorded.sha256) if recorded else (None, None)
    if not name or not digest:
        raise CalibrationDataError("the manifest records no calibration file and sha256 to rebuild from",
                                   "only packages written by an edgeq that records them can be rebuilt")
    if passed is not None:
        if not Path(passed).is_file():
            raise CalibrationDataError(f"calibration file {passed} does not exist",
                                       f"pass the calibration file the package was made with ({name})")
        if sha256_file(Path(passed)) != digest:
            raise CalibrationDataError(f"calibration file {passed} differs from the one the package was made with "
                                       f"({name}, sha256 {str(digest)[:12]})", "pass that file with --calibration")
        return Path(passed)
    if name == CALIBRATION_FILE.name and sha256_file(CALIBRATION_FILE) == digest:
        return CALIBRATION_FILE
    raise CalibrationDataError(f"the package was calibrated on {name} (sha256 {str(digest)[:12]}), not the bundled "
                               "calibration text", "pass that file with --calibration FILE")


def _check_evaluation(manifest: Manifest) -> None:
    digest = manifest.accuracy.evaluation_sha256
    if digest is not None and sha256_file(EVALUATION_FILE) != digest:
        raise CalibrationDataError(f"the bundled evaluation split {EVALUATION_FILE.name} changed since the package "
                                   f"was made (sha256 {digest[:12]} recorded)",
                                   "rebuild with the edgeq version that made the package")
