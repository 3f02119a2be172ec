"""The ``edgeq`` command line. One handler turns every EdgeqError into ``error:``/``hint:`` and its exit status."""

from __future__ import annotations

import functools
import json
import math
import os
import select
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import click

from edgeq.errors import EdgeqError, UserInputError
from edgeq.families import supported_gguf_archs
from edgeq.profiles import INT4_METHODS, QNN_EP
from edgeq.targets import TARGETS

if TYPE_CHECKING:  # the typed manifest is read by the commands that open a package, not at start-up
    from edgeq.manifest_schema import EncoderAccuracyRecord, LMAccuracyRecord, Manifest, QnnRecord


def handle_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except EdgeqError as exc:
            click.echo(f"error: {exc.message}", err=True)
            if exc.hint:
                click.echo(f"hint: {exc.hint}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt as exc:  # SIGINT; SIGTERM and SIGHUP too while an export runs (edgeq.staging)
            signum = getattr(exc, "signum", signal.SIGINT)
            click.echo(f"error: {getattr(exc, 'message', '') or 'interrupted'}", err=True)
            sys.exit(128 + signum)  # the shell's convention for a process stopped by a signal
    return wrapper


class FiniteFloatRange(click.FloatRange):
    """A FloatRange that also refuses nan and inf: FloatRange's own bound checks use ``<``, which NaN passes."""

    name = "finite float range"

    def convert(self, value, param, ctx):
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


class EdgeqGroup(click.Group):
    """click's own usage errors (a bad flag value, an unknown option, a missing argument) in edgeq's form too:
    ``error:`` and a ``hint:`` naming the command's --help, exit 2."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)  # --help and --version return their code
        except click.UsageError as exc:
            click.echo(f"error: {exc.format_message()}", err=True)
            click.echo(f"hint: see '{exc.ctx.command_path if exc.ctx else 'edgeq'} --help'", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            if not stdout_closed():  # another pipe (a device worker's): not the reader going away
                raise
            # `edgeq profiles --fields | head`: the reader has what it wanted. Stop quietly with 0, stdout pointed
            # at /dev/null so the interpreter's last flush cannot fail again (click alone exits 1 here).
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            ctx.exit(0)


def stdout_closed() -> bool:
    """stdout is a pipe or socket whose reader has gone (poll reports an error on its write end)."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, ValueError, OSError):  # not a file (CliRunner's buffer), or closed already
        return False
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))


@click.group(cls=EdgeqGroup)
@click.version_option(package_name="edgeq")
def main() -> None:
    """Turn a Hugging Face model folder into a quantized, verified ONNX Runtime package."""


@main.command("export")
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--profile", "profile", required=True, help="Profile name (see 'edgeq profiles') or a .toml file.")
@click.option("-o", "--out", "out_dir", type=click.Path(path_type=Path), default=Path("build"), show_default=True,
              help="Folder the package is written into, as OUT/<model>-<profile>/ (OUT/NAME/ with --name).")
@click.option("--calibration", type=click.Path(path_type=Path), help="Calibration text (.jsonl or .txt) instead of the bundled split.")
@click.option("--samples", type=click.IntRange(min=1), help="Calibration texts to use (default: the profile's).")
@click.option("--seq-len", type=click.IntRange(min=8), help="Max tokens per calibration text (default: the profile's); "
              "for QNN profiles the model's static sequence length (qnn.seq_len).")
@click.option("--force", is_flag=True, help="Replace an existing package.")
@click.option("--gguf-file", help=f"Name of a GGUF file in MODEL_DIR (architectures "
              f"{', '.join(supported_gguf_archs())}): its tensors are dequantized one at a time as the layers are built.")
@click.option("--allow-pickle", is_flag=True, help="Accept pickle files in MODEL_DIR and use pytorch_model.bin weights "
              "where there are no safetensors, loaded with torch.load(weights_only=True); recorded in the manifest.")
@click.option("--int4-method", type=click.Choice(INT4_METHODS),
              help="Causal LMs: how INT4 weights are chosen (default: the profile's llm.int4_method).")
@click.option("--max-size-mb", type=FiniteFloatRange(min=0), help="Causal LMs: largest model in MB, 0 for none; 8-bit "
              "promotions are taken only while they fit this and llm.max_bits_per_weight (default: the profile's "
              "llm.max_size_mb).")
@click.option("--set", "settings", multiple=True, metavar="KEY=VALUE",
              help="Override a profile field, e.g. --set llm.symmetric=true (keys: edgeq profiles --fields).")
@click.option("--name", help="The package's name: OUT/NAME/ holding NAME.zip (default: <model>-<profile>); letters, "
              "digits, '.', '_' and '-'. Recorded in the manifest, so 'verify --rebuild' rebuilds it under that name.")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
@handle_errors
def export_cmd(model_dir, profile, out_dir, calibration, samples, seq_len, force, gguf_file, allow_pickle, int4_method,
               max_size_mb, settings, name, quiet) -> None:
    """Export MODEL_DIR to a quantized package for a device profile."""
    from edgeq.profiles import load_profile, parse_setting
    from edgeq.progress import HEARTBEAT, Progress

    overrides = dict(parse_setting(s) for s in settings)
    if int4_method:
        overrides["llm.int4_method"] = int4_method
    if max_size_mb is not None:
        overrides["llm.max_size_mb"] = max_size_mb
    p = load_profile(profile)
    if p.status == "deprecated":
        click.echo(f"note: profile '{p.name}' is deprecated: {p.note}", err=True)
    with Progress(not quiet, heartbeat=HEARTBEAT) as progress:
        # the first line before the pipeline's imports (torch, onnxruntime: 1.5 s warm, over 10 s from a cold disk)
        progress.stage("check", f"inputs: {model_dir}, profile {p.name}, output {out_dir}")
        from edgeq.manifest import read_manifest
        from edgeq.pipeline import ExportRequest, export_package

        req = ExportRequest(model_dir, profile, out_dir, calibration, samples, seq_len, force, gguf_file,
                            allow_pickle=allow_pickle, settings=tuple(overrides.items()), name=name)
        pkg = export_package(req, progress)
    click.echo(f"wrote {pkg.path}")
    click.echo(accuracy_line(read_manifest(pkg.path).accuracy))


def _interval_text(acc: LMAccuracyRecord) -> str:
    bounds = acc.ppl_increase_interval
    return f"; 95% over windows {bounds[0]:+.1%} to {bounds[1]:+.1%}" if bounds else ""


def accuracy_line(acc: EncoderAccuracyRecord | LMAccuracyRecord) -> str:
    from edgeq.manifest_schema import LMAccuracyRecord

    if isinstance(acc, LMAccuracyRecord):
        return (f"accuracy vs FP32 on {acc.tokens} held-back tokens: perplexity {acc.perplexity:.3f} vs "
                f"{acc.ref_perplexity:.3f} ({acc.ppl_increase:+.2%}{_interval_text(acc)}), "
                f"mean KL {acc.mean_kl:.4f}, "
                f"top-1 agreement {acc.top1_agreement:.3f}")
    return (f"accuracy vs FP32 on {acc.samples} held-back texts: mean cosine {acc.mean_cosine:.5f}, "
            f"min cosine {acc.min_cosine:.5f}, retrieval top-1 agreement {acc.retrieval_top1:.3f}")


def qnn_line(q: QnnRecord) -> str:
    runs, ctx = q.simulator.runs, q.context.file
    # node counts from the QDQ model's run: the context model is one EPContext node
    where = next((r.placement for name, r in runs.items() if name != ctx), runs[ctx].placement)
    acc = runs[ctx].accuracy_vs_fp32
    return (f"qnn      soc_model {q.soc_model} (Hexagon v{q.htp_arch}), {ctx}: "
            f"{where.nodes.get(QNN_EP, 0)} of {sum(where.nodes.values())} nodes on HTP in "
            f"{sum(where.partitions.values())} partition(s), CPU fallback {q.simulator.cpu_ep_fallback}; "
            f"on the HTP simulator vs FP32: mean cosine {acc.mean_cosine:.5f}, min {acc.min_cosine:.5f} on "
            f"{acc.samples} texts")


@main.command("profiles")
@click.option("--fields", is_flag=True, help="Document every profile field instead of listing profiles.")
@click.option("--names", is_flag=True, help="Only the names of the supported (not deprecated) profiles, one a line.")
@click.option("--model", "model_dir", type=click.Path(path_type=Path),
              help="With --names: only the profiles that take this model folder's kind (encoder, causal-lm).")
@click.option("--gguf-file", help="With --model: the GGUF file in MODEL_DIR that is the model (as export takes it).")
@handle_errors
def profiles_cmd(fields, names, model_dir, gguf_file) -> None:
    """List the device profiles: name and target, the model kinds each takes and how it quantizes them."""
    from edgeq.profile_table import field_lines, profile_lines
    from edgeq.profiles import known_profiles, load_profile

    if gguf_file and not model_dir:
        raise click.UsageError("--gguf-file only goes with --model")
    if model_dir and not names:
        raise click.UsageError("--model only goes with --names")
    if names:
        from edgeq.modelsource import inspect_model_dir

        kind = inspect_model_dir(model_dir, gguf_file).kind if model_dir else None
        for name in known_profiles():
            p = load_profile(name)
            if p.status == "supported" and (kind is None or kind in p.model_kinds):
                click.echo(p.name)
        return
    if fields:
        click.echo("\n".join(field_lines()))
        return
    for name in known_profiles():
        click.echo("\n".join(profile_lines(load_profile(name))))


@main.command("families")
@click.option("--json", "as_json", is_flag=True, help="The registry as JSON (every field of every family).")
@handle_errors
def families_cmd(as_json) -> None:
    """List the model families (kind, model types, GGUF architecture, exporter, runtime type, status, tests)."""
    from edgeq.families import FAMILIES, describe, table_lines

    click.echo(json.dumps([describe(f) for f in FAMILIES], indent=2) if as_json else "\n".join(table_lines()))


@main.command("targets")
@click.argument("package", type=click.Path(path_type=Path), required=False)
@handle_errors
def targets_cmd(package) -> None:
    """List the device targets 'verify --on' takes; with PACKAGE, print only the one its profile targets."""
    from edgeq.targets import TARGETS, device_for

    if package is not None:
        from edgeq.manifest import read_manifest

        click.echo(device_for(read_manifest(package).model.execution_provider).name)
        return
    import textwrap

    width = max(map(len, TARGETS)) + 2
    for name, target in TARGETS.items():  # 100 columns: what runs it wraps under itself
        click.echo(textwrap.fill(target.runs_on, 100, initial_indent=f"{name:<{width}}", subsequent_indent=" " * width))


@main.command("inspect")
@click.argument("package", type=click.Path(path_type=Path))
@click.option("--nodes", is_flag=True, help="Also list every node's precision decision and reason.")
@handle_errors
def inspect_cmd(package, nodes) -> None:
    """Show a package's files, precision per op category, and measured accuracy."""
    from edgeq.manifest import read_manifest

    click.echo("\n".join(package_lines(package, read_manifest(package), nodes)))


def package_lines(package: Path, m: Manifest, nodes: bool) -> list[str]:
    """inspect's lines: every field they show was typed and checked when the manifest was read."""
    lines: list[str] = []
    echo = lines.append
    echo(f"package  {package}\nprofile  {m.profile.name}\nsource   {m.source_name} ({m.source.architecture})")
    echo("files:")
    for name, e in m.files.items():
        echo(f"  {e.size / 1e6:10.2f} MB  {name}")
    echo("precision by op category (nodes):")
    for cat, counts in m.precision.summary.items():
        echo(f"  {cat:18s} " + ", ".join(f"{p}: {n}" for p, n in sorted(counts.items())))
    z = m.size
    if z.ratio is not None:
        echo(f"size     {z.model_bytes / 1e6:.2f} MB model, {z.ratio:.1%} of the FP32 ONNX export "
             f"({z.fp32_onnx_bytes / 1e6:.1f} MB; profile allows {z.max_ratio:.0%})")
    else:
        cap = f"{z.max_mb:g} MB" if z.max_mb else "no absolute cap"
        bits = "" if z.bits_per_weight is None else \
            f", linear layers {z.bits_per_weight:.3f} bits per weight (profile allows {z.max_bits_per_weight:g})"
        echo(f"size     {z.model_bytes / 1e6:.2f} MB model{bits}; profile size cap: {cap}")
    echo(accuracy_line(m.accuracy))
    if m.qnn is not None:
        echo(qnn_line(m.qnn))
    for ep, r in (m.partitions.checks if m.partitions else {}).items():
        a, f = r.as_is, r.fixed_shapes
        echo(f"{ep} {r.verdict}: takes {a.supported_nodes}/{a.nodes} nodes in {a.partitions} "
             f"partitions ({f.supported_nodes} in {f.partitions} with fixed input shapes)")
    if nodes:
        for d in m.precision.nodes:
            echo(f"  {d.precision:16s} {d.name}: {d.reason}")
    return lines


@main.command("verify")
@click.argument("package", type=click.Path(path_type=Path))
@click.option("--on", "on", default="host", show_default=True, type=click.Choice(list(TARGETS)),
              help="Where to run the model: " + "; ".join(f"{t.name}: {t.runs_on}" for t in TARGETS.values()) + ".")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--rebuild", is_flag=True, help="Then export again from the manifest's recorded inputs into a temporary "
              "folder and compare every file's bytes (exit 1 if one differs, 2 if an input is missing or differs).")
@click.option("--model", "model_dir", type=click.Path(path_type=Path), help="With --rebuild: the source model folder "
              "(manifests record it by name and file hashes, not by path).")
@click.option("--calibration", type=click.Path(path_type=Path), help="With --rebuild: the calibration file, when the "
              "package was not calibrated on the bundled text (its sha256 must match the manifest's).")
@click.option("--profile", "profile_file", type=click.Path(path_type=Path), help="With --rebuild: the profile .toml, "
              "when it is not a bundled one (its sha256 must match the manifest's).")
@handle_errors
def verify_cmd(package, on, as_json, rebuild, model_dir, calibration, profile_file) -> None:
    """Rehash every file, load the model, and reproduce the stored reference outputs."""
    from edgeq.errors import VerificationError
    from edgeq.stages.verify import verify

    given = [flag for flag, value in (("--model", model_dir), ("--calibration", calibration),
                                      ("--profile", profile_file)) if value is not None]
    if given and not rebuild:
        raise click.UsageError(f"{', '.join(given)} only go with --rebuild")
    report = verify(package, on)
    if as_json:
        click.echo(json.dumps({"ok": report.ok, "checks": report.checks}, indent=1))
    else:
        for name, ok, detail in report.checks:
            click.echo(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}")
    if not report.ok:
        raise VerificationError(f"{package} failed verification", "re-export the package; do not ship it")
    click.echo(f"verified {package} on {on}")
    if rebuild:
        from edgeq.progress import HEARTBEAT, Progress
        from edgeq.rebuild import check_rebuild

        with Progress(heartbeat=HEARTBEAT) as progress:
            check_rebuild(package, model_dir, calibration, profile_file, click.echo, progress)


@main.command("run")
@click.argument("package", type=click.Path(path_type=Path))
@click.option("--prompt", required=True, help="User message; the package's chat template wraps it when it has one.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--raw", is_flag=True, help="Send the prompt as is, without the chat template.")
@handle_errors
def run_cmd(package, prompt, max_new_tokens, raw) -> None:
    """Generate text with an LLM package through onnxruntime-genai, streamed as it is produced."""
    from edgeq.llm.genai import chat_prompt, generate
    from edgeq.manifest import read_manifest

    if not read_manifest(package).is_llm:  # a package from anyone: read it checked first
        raise UserInputError(f"{package} is not an LLM package", "edgeq run generates with causal-LM packages")
    text = prompt if raw else chat_prompt(package, prompt)
    for piece in generate(package, text, max_new_tokens):
        click.echo(piece, nl=False)
    click.echo()


@main.command("eval")
@click.argument("package", type=click.Path(path_type=Path))
@click.option("--text", "text_file", type=click.Path(path_type=Path), required=True,
              help="Text to measure on (.jsonl with 'text' fields, or .txt).")
@click.option("--reference", type=click.Path(path_type=Path), help="FP32 ONNX model to compare with (default: none, "
              "perplexity only).")
@handle_errors
def eval_cmd(package, text_file, reference) -> None:
    """Perplexity of an LLM package on a text file; with --reference also KL and top-1 agreement vs that model."""
    from edgeq.llm.eval_cmd import evaluate_package

    click.echo(accuracy_line(evaluate_package(package, text_file, reference)))


@main.command("report")
@click.argument("packages", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--out", "out_dir", type=click.Path(path_type=Path),
              help="Folder for REPORT.md and its PNG plots (or report.html), plus report.json (default: report/ "
              "beside the first package, e.g. build/report for build/PACKAGE).")
@click.option("--html", "as_html", is_flag=True, help="Write one self-contained report.html (plots inlined).")
@click.option("--no-speed", is_flag=True, help="Skip speed measurements (sizes and accuracy from the manifests only).")
@click.option("--no-plots", is_flag=True, help="Markdown table only, no PNG plots (no matplotlib needed).")
@handle_errors
def report_cmd(packages, out_dir, as_html, no_speed, no_plots) -> None:
    """Compare packages: size, accuracy vs FP32, speed on this machine; the first package is the reference."""
    from edgeq.report import default_report_dir, report_packages

    out_dir = out_dir or default_report_dir(packages)
    for path in report_packages(packages, out_dir, speed=not no_speed, as_html=as_html, plots=not no_plots):
        click.echo(f"wrote {path}")


@main.command("matrix")
@click.argument("matrix_file", type=click.Path(path_type=Path))
@click.option("-o", "--out", "out_dir", type=click.Path(path_type=Path), default=Path("build/matrix"),
              show_default=True, help="The store: OUT/cells/<key>/ per cell, OUT/matrix.md, .html and .json. With "
              "--ray, a folder every node reaches at the same path.")
@click.option("--jobs", type=click.IntRange(min=1), help="Cells built at once on this machine (default 1; each "
              "export already uses every core), as long as their declared memory fits what is available.")
@click.option("--ray", "ray_address", metavar="ADDRESS|auto", help="Build the cells as tasks on the Ray cluster at "
              "ADDRESS (or the one this machine belongs to: auto) instead of on this machine; needs the 'ray' extra.")
@click.option("--retry-failed", is_flag=True, help="Build the cells whose failure the store records again (a lost "
              "worker, memory, a device); without it they are reported as they are.")
@click.option("-q", "--quiet", is_flag=True, help="No progress output.")
@handle_errors
def matrix_cmd(matrix_file, out_dir, jobs, ray_address, retry_failed, quiet) -> None:
    """Export and verify every model x profile of MATRIX_FILE, each cell once per distinct input.

    MATRIX_FILE (TOML): at the top profiles = [...] and optional set = ["KEY=VALUE", ...], device_check = true and
    calibration = FILE; then one [[model]] table per model (path = a model folder or .gguf file; optional name,
    gguf_file, set, memory_mb, allow_pickle) and optional [[cell]] tables (model and/or profile, set, device_check)
    overriding the cells they match. A cell whose inputs
    hash to a key the store holds a verified package for is not built again; a failed cell records its error and the
    others go on."""
    from edgeq.progress import Progress

    if ray_address and jobs:
        raise click.UsageError("--jobs sizes the local pool; with --ray the cluster's resources decide")
    with Progress(not quiet) as progress:
        progress.stage("check", f"matrix {matrix_file}, store {out_dir}")
        from edgeq.matrix.run import run_matrix

        if ray_address:
            from edgeq.matrix.ray_exec import RayExecutor

            executor = RayExecutor(ray_address)
        else:
            from edgeq.matrix.local import LocalExecutor

            executor = LocalExecutor(jobs or 1)
        run = run_matrix(matrix_file, out_dir, executor, retry_failed, progress)
    for path in run.summary:
        click.echo(f"wrote {path}")
    if run.not_ok:
        raise EdgeqError(f"{len(run.not_ok)} of {len(run.cells)} cells are not ok: "
                         f"{', '.join(c.name for c in run.not_ok[:8])}{' ...' if len(run.not_ok) > 8 else ''}",
                         f"their errors are in {run.summary[0]}; fix what they say and run again "
                         "(--retry-failed builds failed cells again)")
