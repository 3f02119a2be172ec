"""The whole export, the same for every model and target: validate every input first, then build in a staging
folder with the one recipe for the model's kind and the profile's target (``edgeq.recipes.recipe_for``), write the
manifest, hold the package to its budgets, verify it, and move it into place. Nothing half-written is ever left at
OUT."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path

from edgeq.errors import ModelFolderError, OutputExistsError, UnsupportedModelError, UserInputError, VerificationError
from edgeq.families import OPTIMUM, by_model_type
from edgeq.heap import release_freed_memory
from edgeq.modelsource import ModelSource, inspect_model_dir
from edgeq.profiles import QNN_EP, load_profile
from edgeq.progress import QUIET, Progress
from edgeq.recipes import recipe_for
from edgeq.request import ExportRequest, Inputs
from edgeq.staging import space_needed, staged, write_zip
from edgeq.stages.export import require_optimum
from edgeq.stages.package import Package, finish
from edgeq.stages.verify import verify
from edgeq.textdata import CALIBRATION_FILE, EVALUATION_FILE, check_disjoint, fit_calibration_samples, load_texts

__all__ = ["ExportRequest", "Inputs", "check_inputs", "check_package_name", "export_package"]

# --name is the package's folder in OUT, its zip's name and the zip's top folder: 'export --force' replaces that
# folder, so the name is a plain one that no shell, zip tool or file system reads as a path or hides.
PACKAGE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_package_name(name: str) -> str:
    if ".." in name or not PACKAGE_NAME.fullmatch(name):
        raise UserInputError(f"--name {name!r} cannot name a package folder",
                             "use up to 128 letters, digits, '.', '_' and '-', starting with a letter or digit and "
                             "without '..', e.g. --name minilm-finetuned-android-arm64")
    return name


def check_inputs(req: ExportRequest, source: ModelSource | None = None) -> Inputs:
    """Every user mistake is caught here, before minutes of work. ``source``: ``req.model_dir`` as
    ``inspect_model_dir`` already read it (a matrix checks one model against many profiles and hashes it once)."""
    if req.name is not None:
        check_package_name(req.name)
    profile = load_profile(req.profile, overrides=dict(req.settings))
    source = source or inspect_model_dir(req.model_dir, req.gguf_file, req.allow_pickle)
    if source.kind not in profile.model_kinds:
        raise UnsupportedModelError(f"profile '{profile.name}' does not take {source.kind} models",
                                    f"it takes: {', '.join(profile.model_kinds)}")
    q = profile.quantization
    if req.seq_len is not None and profile.execution_provider == QNN_EP:  # the static shape
        profile = replace(profile, qnn=replace(profile.qnn, seq_len=req.seq_len))
    if req.samples is not None or req.seq_len is not None:
        q = replace(q, calibration_samples=req.samples or q.calibration_samples,
                    calibration_seq_len=req.seq_len or q.calibration_seq_len)
        profile = replace(profile, quantization=q)
    calibration = load_texts(req.calibration or CALIBRATION_FILE)
    evaluation = load_texts(EVALUATION_FILE)
    check_disjoint(calibration, evaluation)
    if source.kind == "causal-lm":  # numbers the model cannot take fail here, not minutes into the run
        from edgeq.llm.limits import check_llm_lengths

        if req.samples is not None:
            raise UserInputError("--samples counts calibration texts for encoders; a causal LM calibrates on "
                                 "llm.calibration_windows windows of llm.window_tokens tokens",
                                 "drop --samples; use --set llm.calibration_windows=N")
        check_llm_lengths(source, profile.llm)
    else:
        profile = fit_calibration_samples(profile, calibration, req.samples, dict(req.settings))
    if Path(req.out_dir).exists() and not Path(req.out_dir).is_dir():
        raise OutputExistsError(f"output path {req.out_dir} is a file, not a folder", "pass -o a folder (it is created if missing)")
    dest = Path(req.out_dir) / (req.name or f"{source.name}-{profile.name}")
    # the profile name is plain (edgeq.profiles.check_profile_name); the model's comes from a folder or GGUF file
    # name: 'export --force' replaces dest, so it must be a folder directly inside OUT, never a hidden one
    plain = not source.name.startswith(".") and not any(c in source.name for c in "/\\") and source.name.isprintable()
    if req.name is None and not plain:
        raise ModelFolderError(f"the model name {source.name!r} cannot name a package folder",
                               "rename the model folder (or GGUF file) to letters, digits, '.', '_' and '-', or "
                               "name the package with --name")
    if dest.resolve().parent != Path(req.out_dir).resolve():
        raise OutputExistsError(f"{dest} does not resolve to a folder directly inside {req.out_dir} (a symlink?)",
                                "remove it, or pass -o to write elsewhere")
    if dest.exists() and not req.force:
        raise OutputExistsError(f"{dest} already exists", "pass --force to replace it, or -o to write elsewhere")
    family = by_model_type(source.model_type)
    if family is not None and family.exporter == OPTIMUM:  # an optional extra: missing, it is the user's to install
        require_optimum(f"{source.model_type} models", load=False)
    return Inputs(source, profile, calibration, evaluation, dest)


def export_package(req: ExportRequest, progress: Progress = QUIET, inputs: Inputs | None = None) -> Package:
    """``inputs``: what ``check_inputs(req)`` returned, when the caller has checked them already."""
    inputs = inputs or check_inputs(req)
    recipe = recipe_for(inputs.source.kind, inputs.profile)
    with staged(inputs.dest, req.force, space_needed(inputs.source, inputs.profile)) as stage:
        built = recipe.build(inputs, req, stage.folder, stage.work, progress)
        manifest = built.manifest
        finish(stage.folder, manifest)  # file hashes, then manifest.json
        if built.over_budget:  # the staging folder goes with the exception: nothing over budget is placed
            raise built.over_budget[0]
        release_freed_memory()  # what the build freed; verify loads the package once more
        progress.stage("verify", str(stage.folder))
        if inputs.profile.package.zip:
            write_zip(stage.folder)
        report = verify(stage.folder, profile=inputs.profile)  # the bars it was built with, --set included
        if not report.ok:
            bad = "; ".join(f"{n}: {d}" for n, ok, d in report.checks if not ok)
            raise VerificationError(f"fresh package failed verification: {bad}", "this is an edgeq bug; please report it")
        stage.place()
    size = sum(e["size"] for n, e in manifest["files"].items() if n.startswith("model."))
    progress.stage("done", f"{inputs.dest} ({size / 1e6:.1f} MB model)")
    return Package(inputs.dest, manifest)
