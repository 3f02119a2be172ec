"""Wall time and peak RSS against parameter count: 1B-8B checkpoints through edgeq and its peers (issue 14).

    python bench/scale.py run llama-3.2-1b [--tools writer,edgeq,edgeq-rtn,edgeq-rtn-genai,genai-builder,mobius]
                                           [--cap-gb 20] [--timeout 900]
    python bench/scale.py md                    # BENCHMARKS.md's scale section from the results file

RANDOM WEIGHTS: the checkpoints (bench/checkpoints.py) have the configs of the published models and random BF16
weights, so no accuracy figure from them means anything. The edgeq row runs with its accuracy and size gates opened
(``--set llm.max_ppl_increase=1e6 --set llm.min_top1_agreement=0 --max-size-mb 1e9``): the bench measures what an
export costs, never whether it would pass.

Each (checkpoint, tool, stage) runs in its own child under bench/measure.py (wall time, the child's own peak RSS, a
timeout and an RSS cap), one after another: one big job at a time on the shared machine. Rows are appended to the
results file; ``md`` renders the latest row per (model, tool, stage). Adding a tool is one entry in TOOLS.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path[:0] = [str(ROOT), str(BENCH)]

import measure  # noqa: E402  (light: the parent stays small, see measure.py)

from edgeq.report import write_atomic  # noqa: E402  (standard library only)

CHECKPOINTS = Path("/work/tmp/scale")
RESULTS = BENCH / "results" / "scale.json"
MAIN_PYTHON = Path("/work/main/.venv/bin/python")
MOBIUS_VENV = Path("/work/venvs/mobius")
MIN_FREE_GB = 40.0  # a checkpoint is written only if this much disk stays free after it
NOTE = ("Random BF16 weights with the published configs: no accuracy meaning; the edgeq row runs with its accuracy "
        "and size gates opened")
OPEN_GATES = ["--set", "llm.max_ppl_increase=1000000", "--set", "llm.min_top1_agreement=0", "--max-size-mb", "1e9"]


@dataclass(frozen=True)
class Job:
    model: str
    checkpoint: Path
    out: Path  # this tool's own output folder (emptied before the run)


@dataclass(frozen=True)
class Tool:
    key: str  # --tools name
    name: str  # the table's tool column
    stage: str
    command: Callable[[Job], list[str]]
    unavailable: Callable[[Job], str | None]  # why the tool cannot run here, or None
    env: Callable[[], dict[str, str]] = lambda: {}
    note: Callable[[], str] = lambda: ""


def _python() -> str:
    return str(MAIN_PYTHON if MAIN_PYTHON.exists() else Path(sys.executable))


def _imports(python: str, module: str) -> str | None:
    """None when ``python -c 'import module'`` works, else the error's last line."""
    p = subprocess.run([python, "-c", f"import {module}"], capture_output=True, text=True, timeout=300)
    return None if p.returncode == 0 else (p.stderr.strip().splitlines() or ["?"])[-1]


def _writer_unavailable(job: Job) -> str | None:
    sys.path.insert(0, str(BENCH))
    from checkpoints import CONFIGS, parameter_count  # numpy is imported here, in the parent: only for the count

    need = 2 * parameter_count(CONFIGS[job.model]) / 1e9
    free = shutil.disk_usage(job.checkpoint.parent if job.checkpoint.parent.exists() else "/").free / 1e9
    if free - need < MIN_FREE_GB:
        return f"not written: {need:.1f} GB would leave {free - need:.1f} GB free (< {MIN_FREE_GB:g} GB)"
    return None


def _needs_checkpoint(job: Job) -> str | None:
    return None if (job.checkpoint / "config.json").is_file() else f"no checkpoint at {job.checkpoint}"


@functools.cache
def _genai_python() -> tuple[str | None, str]:
    """The first interpreter where the GenAI builder imports (edgeq's venv first; onnxruntime-genai 0.18's builder
    needs a newer transformers than edgeq's 4.57 pin, which the mobius venv has), and why the others were passed."""
    errors = []
    for python in (_python(), str(MOBIUS_VENV / "bin" / "python")):
        if not Path(python).exists():
            continue
        err = _imports(python, "onnxruntime_genai.models.builder")
        if err is None:
            return python, f"run with {python}" + "".join(f" ({e})" for e in errors)
        errors.append(f"not importable in {python}: {err}")
    return None, "; ".join(errors)


def _genai_unavailable(job: Job) -> str | None:
    python, why = _genai_python()
    return _needs_checkpoint(job) or (None if python else f"onnxruntime_genai.models.builder {why}")


def _mobius_unavailable(job: Job) -> str | None:
    if not (MOBIUS_VENV / "READY").exists():
        return f"{MOBIUS_VENV} is not ready (no READY file)"
    return _needs_checkpoint(job)


def _edgeq_tool(key: str, stage: str, *args: str) -> Tool:
    """``edgeq export`` with the bundled android-arm64 profile, ``args`` and the gates opened."""
    return Tool(key, "edgeq export", stage,
                lambda j: [_python(), "-c", "from edgeq.cli import main; main()", "export", str(j.checkpoint),
                           "--profile", "android-arm64", "-o", str(j.out), "--force", *args, *OPEN_GATES],
                _needs_checkpoint, env=lambda: {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"},
                note=lambda: "accuracy and size gates opened")


def _package(job: Job, key: str) -> Path | None:
    """The package the ``key`` tool's export wrote for this model (the folder holding manifest.json)."""
    folder = job.out.parent / key
    return next((p for p in sorted(folder.iterdir()) if (p / "manifest.json").is_file()), None) \
        if folder.is_dir() else None


def _run_tool(key: str) -> Tool:
    """``edgeq run`` on the ``key`` tool's package: loaded whole in onnxruntime-genai, as an app loads it, and 16
    greedy tokens generated (the export itself runs a package larger than one part in parts)."""
    return Tool(f"{key}-genai", "edgeq run", f"load the {key} package in onnxruntime-genai, generate 16 tokens",
                lambda j: [_python(), "-c", "from edgeq.cli import main; main()", "run", str(_package(j, key)),
                           "--prompt", "Count from 1 to 20, separated by commas.", "--max-new-tokens", "16"],
                lambda j: None if _package(j, key) else f"no {key} package yet: run --tools {key} first",
                env=lambda: {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"})


TOOLS: tuple[Tool, ...] = (
    Tool("writer", "bench/checkpoints.py", "write BF16 checkpoint",
         lambda j: [_python(), str(BENCH / "checkpoints.py"), j.model, "--out", str(j.checkpoint)],
         _writer_unavailable, note=lambda: "random weights, generated and written 16M values at a time"),
    _edgeq_tool("edgeq", "export android-arm64 (INT4 GPTQ)"),
    _edgeq_tool("edgeq-rtn", "export android-arm64 --int4-method rtn", "--int4-method", "rtn"),
    _run_tool("edgeq-rtn"),
    Tool("genai-builder", "onnxruntime-genai model builder", "build int4 cpu",
         lambda j: [str(_genai_python()[0]), "-m", "onnxruntime_genai.models.builder", "-i", str(j.checkpoint), "-o",
                    str(j.out / "model"), "-p", "int4", "-e", "cpu", "-c", str(j.out / "cache")],
         _genai_unavailable, env=lambda: {"HF_HUB_OFFLINE": "1"},
         note=lambda: _genai_python()[1]),
    Tool("mobius", "mobius-onnx", "build fp32 (--ep cpu)",
         lambda j: [str(MOBIUS_VENV / "bin" / "mobius"), "build", "--config", str(j.checkpoint), str(j.out / "model"),
                    "--ep", "cpu", "--dtype", "f32"],
         _mobius_unavailable, env=lambda: {"HF_HUB_OFFLINE": "1"}),
)


# ------------------------------------------------------------------------------------------------------- running
def parameters(model: str) -> int:
    from checkpoints import CONFIGS, parameter_count

    return parameter_count(CONFIGS[model])


def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    mem = next(int(ln.split()[1]) for ln in Path("/proc/meminfo").read_text().splitlines()
               if ln.startswith("MemTotal"))
    return f"{cpu}, {os.cpu_count()} cores, {mem / 2**20:.1f} GiB RAM"


def run_tool(tool: Tool, job: Job, *, cap_gb: float, timeout_s: float, logs: Path) -> dict:
    """One row: the tool's measurement, or why it was skipped."""
    row = {"model": job.model, "params": parameters(job.model), "tool": tool.name, "stage": tool.stage,
           "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "machine": machine(), "tool_note": tool.note(), "note": NOTE,
           "cap_gb": cap_gb, "timeout_s": timeout_s}
    why = tool.unavailable(job)
    if why:
        return row | {"status": f"skipped: {why}"}
    shutil.rmtree(job.out, ignore_errors=True)
    job.out.mkdir(parents=True)
    cmd = tool.command(job)
    load_before = os.getloadavg()
    m = measure.run(cmd, log_dir=logs / f"{job.model}-{tool.key}", cap_gb=cap_gb, timeout_s=timeout_s,
                    env=dict(os.environ) | tool.env(), cwd=job.out)
    log = logs / f"{job.model}-{tool.key}"
    progress = (log / "stderr.txt").read_text(errors="replace") if (log / "stderr.txt").is_file() else ""
    stages = stage_seconds(progress, m.wall_s)
    return row | {"command": " ".join(cmd), "load_average": [load_before[0], os.getloadavg()[0]],
                  "bytes_per_param": m.peak_rss_gb * 1e9 / row["params"], "stages": stages,
                  "stage_peak_gb": stage_peaks(progress, measure.read_series(log)),
                  "output_gb": output_bytes(job.checkpoint if tool.key == "writer" else job.out) / 1e9} | m.to_dict()


_STAGE_LINE = re.compile(r"^\[\s*([\d.]+)s\] ([\w-]+):", re.M)


def stage_seconds(progress: str, wall_s: float) -> dict[str, float]:
    """Seconds per stage from edgeq's progress lines (``[  12.3s] measure: ...``): each stage runs until the next
    one starts, the last until the process ended; the time before the first line is "start"."""
    starts = [(float(t), name) for t, name in _STAGE_LINE.findall(progress)]
    if not starts:
        return {}
    out = {"start": starts[0][0]}
    for (t, name), (t_next, _) in zip(starts, starts[1:] + [(wall_s, "")]):
        out[name] = out.get(name, 0.0) + max(t_next - t, 0.0)
    return {k: round(v, 1) for k, v in out.items()}


def stage_peaks(progress: str, series: list[tuple[float, int]]) -> dict[str, float]:
    """Peak sampled RSS (GB) per stage: each sample goes to the stage whose progress line came last before it
    (edgeq's clock starts a few ms after the sampler's: a sample on a boundary may land in the earlier stage)."""
    starts = [(float(t), name) for t, name in _STAGE_LINE.findall(progress)]
    out: dict[str, float] = {}
    for t, rss in series:
        name = next((n for s, n in reversed(starts) if s <= t), "start")
        out[name] = max(out.get(name, 0.0), rss / 1e9)
    return {k: round(v, 2) for k, v in out.items()}


def output_bytes(folder: Path) -> int:
    """What a tool wrote (a GenAI builder's download cache left out)."""
    files = (f for f in folder.rglob("*") if f.is_file() and "cache" not in f.relative_to(folder).parts)
    return sum(f.stat().st_size for f in files)


def append_result(path: Path, row: dict) -> None:
    rows = json.loads(path.read_text()) if path.exists() else []
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(rows + [row], indent=1) + "\n")


# -------------------------------------------------------------------------------------------------------- output
def errors(stderr_tail: str) -> list[str]:
    """The exception lines of a traceback tail, first raised first (a chained traceback names its cause first)."""
    found = [ln.strip() for ln in stderr_tail.splitlines() if re.match(r"^[\w.]+(Error|Exception|Exit):", ln)]
    return list(dict.fromkeys(found))


def _status_cell(row: dict) -> str:
    status = row["status"]
    if status.startswith("failed") and row.get("stderr_tail"):
        why = errors(row["stderr_tail"]) or row["stderr_tail"].strip().splitlines()[-1:]
        status += ": " + " -> ".join(f"`{e[:140]}`" for e in why)
    return status.replace("|", "\\|")


def table(rows: list[dict]) -> str:
    """The latest row per (model, tool, stage), in the order first run."""
    latest: dict[tuple, dict] = {}
    for r in rows:
        latest[(r["model"], r["tool"], r["stage"])] = r
    lines = ["| model | params | tool | stage | wall s | peak RSS GB | bytes per parameter | output GB | status |",
             "|---|---:|---|---|---:|---:|---:|---:|---|"]
    for r in latest.values():
        ran = "wall_s" in r
        out = f"{r['output_gb']:.2f}" if r.get("output_gb") is not None and r["status"] == "ok" else "-"
        lines.append(f"| {r['model']} | {r['params'] / 1e9:.2f} B | {r['tool']} | {r['stage']} | "
                     + (f"{r['wall_s']:.0f} | {r['peak_rss_gb']:.2f} | {r['bytes_per_param']:.1f} | " if ran else
                        "- | - | - | ")
                     + f"{out} | {_status_cell(r)} |")
    notes = dict.fromkeys(f"- {r['tool']}: {r['tool_note']}" for r in latest.values() if r.get("tool_note"))
    stages = [f"- {r['model']}, {r['tool']}: " + ", ".join(_stage_cell(k, v, r.get("stage_peak_gb", {}))
                                                            for k, v in r["stages"].items())
              for r in latest.values() if r.get("stages")]
    return "\n".join(lines + ([""] + list(notes) if notes else [])
                     + (["", "Seconds (and peak sampled RSS, where recorded) per stage:"] + stages if stages else []))


def _stage_cell(stage: str, seconds: float, peaks: dict[str, float]) -> str:
    return f"{stage} {seconds:.0f} s" + (f" / {peaks[stage]:.2f} GB" if stage in peaks else "")


def section(rows: list[dict]) -> str:
    ran = [r for r in rows if "wall_s" in r]
    dates = sorted({r["date"][:10] for r in ran})
    loads = [x for r in ran for x in r["load_average"]]
    head = ["## Scale: 1B-8B checkpoints (issue 14)", "",
            f"Measured with `python bench/scale.py run MODEL` on {', '.join(dates) or '-'}"
            + (f" ({' / '.join(dict.fromkeys(r['machine'] for r in ran))}, shared with other workers: 1-min load "
               f"average {min(loads):.1f}-"
               f"{max(loads):.1f} during the rows)" if ran else "") + ". " + NOTE
            + f" (`{' '.join(OPEN_GATES)}`).", "",
            "Each row is one child process: wall time, and peak RSS as the larger of the child's own `wait4` maximum "
            "(started through a tiny launcher, so the bench's own memory is not inherited) and the sum over its "
            "process session sampled every 0.2 s; RSS counts file pages mapped from the checkpoint. Bytes per "
            "parameter = peak RSS / parameters. A child above the RSS cap is killed and recorded with the RSS it "
            "had reached.", "", table(rows), ""]
    return "\n".join(head)


def update_benchmarks_md(rows: list[dict]) -> Path:
    from bench import _replace_block  # bench/bench.py's marker-block replacement

    path = ROOT / "BENCHMARKS.md"
    return write_atomic(path, _replace_block(path.read_text(), "scale", section(rows)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="measure the tools on one checkpoint")
    r.add_argument("model")
    r.add_argument("--tools", default=",".join(t.key for t in TOOLS))
    r.add_argument("--checkpoints", type=Path, default=CHECKPOINTS, help="checkpoint folders: DIR/<model>")
    r.add_argument("--work", type=Path, default=CHECKPOINTS / "out", help="tool outputs and logs")
    r.add_argument("--cap-gb", type=float, default=20.0)
    r.add_argument("--timeout", type=float, default=900.0, help="seconds per row")
    r.add_argument("--results", type=Path, default=RESULTS)
    m = sub.add_parser("md", help="write BENCHMARKS.md's scale section from the results file")
    m.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if args.cmd == "md":
        print(f"[scale] updated {update_benchmarks_md(json.loads(args.results.read_text()))}")
        return 0
    from checkpoints import CONFIGS

    if args.model not in CONFIGS:
        ap.error(f"unknown model {args.model!r}; one of {', '.join(sorted(CONFIGS))}")
    keys = args.tools.split(",")
    unknown = set(keys) - {t.key for t in TOOLS}
    if unknown:
        ap.error(f"unknown tools {sorted(unknown)}; known: {', '.join(t.key for t in TOOLS)}")
    for tool in (t for t in TOOLS if t.key in keys):
        job = Job(args.model, args.checkpoints / args.model, args.work / args.model / tool.key)
        row = run_tool(tool, job, cap_gb=args.cap_gb, timeout_s=args.timeout, logs=args.work / "logs")
        append_result(args.results, row)
        print(f"[scale] {row['model']} {row['tool']} ({row['stage']}): {row['status']}"
              + (f", {row['wall_s']:.0f} s, peak {row['peak_rss_gb']:.2f} GB" if "wall_s" in row else ""), flush=True)
    print(f"[scale] {NOTE}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
