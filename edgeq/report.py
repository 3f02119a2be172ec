"""A comparison of packages: one typed ``Row`` per variant, rendered as JSON, a Markdown table, PNG plots or one HTML
file. ``edgeq report PACKAGE...`` builds rows from packages' manifests plus speed measured here; ``bench/bench.py``
builds the same rows for edgeq and its peers, so both print the same table.

Accuracy is always against the FP32 export of the source on held-back text: encoders by mean/min cosine and top-1
retrieval agreement (``edgeq.metrics``), LLMs by perplexity, KL and top-1 agreement (``edgeq.llm.evaluate``).
"""

from __future__ import annotations

import base64
import html
import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from edgeq.errors import UserInputError

if TYPE_CHECKING:
    from edgeq.manifest_schema import Manifest

ENCODER, LLM = "encoder", "causal-lm"


@dataclass
class Row:
    """One variant. Speeds and build costs are None when not measured; ``skipped`` says why a row has no numbers."""

    name: str
    kind: str  # ENCODER or LLM
    size_bytes: int | None = None
    accuracy: dict[str, float] = field(default_factory=dict)  # EncoderAccuracy or LMAccuracy fields
    build_s: float | None = None
    peak_rss_mb: float | None = None  # the build's own process (bench/measure.py), not its parent's
    ms_per_sentence: float | None = None  # encoders, batch 1
    prefill_tok_s: float | None = None  # LLMs
    decode_tok_s: float | None = None
    decode_bytes_per_token: int | None = None  # as stored
    path: str | None = None
    note: str = ""
    skipped: str | None = None
    edgeq: bool = False  # the row other rows' ratios are taken against
    decode_bytes_as_run: int | None = None  # as this CPU runs the model (edgeq.speed.decode_bytes_as_run)
    threads: int | None = None  # intra-op threads of the speed runs
    spread: dict[str, dict] = field(default_factory=dict)  # speed key -> bench/runs.py Spread: median, low, high, kept, dropped
    run_peak_rss_mb: float | None = None  # the largest of the speed runs' own peaks

    def ceiling_tok_s(self, bandwidth_gbs: float | None) -> float | None:
        """Bandwidth over the bytes read per token as run (a stored count can be far below what the CPU reads)."""
        if not (bandwidth_gbs and self.decode_bytes_as_run):
            return None
        return bandwidth_gbs * 1e9 / self.decode_bytes_as_run

    def to_dict(self, bandwidth_gbs: float | None = None) -> dict:
        ceiling = self.ceiling_tok_s(bandwidth_gbs)
        return asdict(self) | {"decode_ceiling_tok_s": ceiling,
                               "fraction_of_ceiling": self.decode_tok_s / ceiling if ceiling and self.decode_tok_s else None}

    @classmethod
    def from_dict(cls, d: dict) -> "Row":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


# ---------------------------------------------------------------------------------------------------- Markdown
def _f(v, fmt: str, dash: str = "—") -> str:
    return dash if v is None else format(v, fmt)


def _ratio(v, ref) -> str:
    return f"{v / ref:.2f}x" if v and ref else "—"


def _reference(rows: Sequence[Row]) -> Row | None:
    return next((r for r in rows if r.edgeq and not r.skipped), None)


def _table(columns: Sequence[str], rows: Sequence[Row], cells: Callable[[Row], list[str]]) -> list[str]:
    out = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        if r.skipped:
            out.append(f"| {r.name} | skipped: {r.skipped} |" + " |" * (len(columns) - 2))
        else:
            out.append("| " + " | ".join([r.name] + cells(r)) + " |")
    return out


COST_COLUMNS = ("threads", "build s", "build peak RSS MB", "run peak RSS MB")
ENCODER_COLUMNS = ("variant", "size MB", "size vs edgeq", "mean cosine", "min cosine", "top-1 retrieval",
                   "ms/sentence (batch 1)", "speed vs edgeq", *COST_COLUMNS)
LLM_COLUMNS = ("variant", "size MB", "size vs edgeq", "perplexity", "vs FP32", "95% interval", "KL", "top-1",
               "prefill tok/s", "decode tok/s", "decode vs edgeq",
               "MB/token as run", "MB/token as stored", "ceiling tok/s", "of ceiling", *COST_COLUMNS)


def _size_cells(r: Row, ref: Row | None) -> list[str]:
    return [_f(r.size_bytes and r.size_bytes / 1e6, ".1f"), _ratio(r.size_bytes, ref.size_bytes if ref else None)]


def _cost_cells(r: Row) -> list[str]:
    return [_f(r.threads, "d"), _f(r.build_s, ".0f"), _f(r.peak_rss_mb, ".0f"), _f(r.run_peak_rss_mb, ".0f")]


def _speed(r: Row, key: str, fmt: str) -> str:
    """The median with the kept runs' range and how many runs the outlier rule dropped: "120.9 (114.9 to 121.6)"."""
    value, s = getattr(r, key), r.spread.get(key)
    if value is None or not s:
        return _f(value, fmt)
    dropped = f", {s['dropped']} dropped" if s["dropped"] else ""
    return f"{value:{fmt}} ({s['low']:{fmt}} to {s['high']:{fmt}}{dropped})"


def _encoder_table(rows: Sequence[Row]) -> list[str]:
    ref = _reference(rows)

    def cells(r: Row) -> list[str]:
        a = r.accuracy
        speed = _ratio(ref.ms_per_sentence, r.ms_per_sentence) if ref else "—"  # >1x: faster than edgeq
        return (_size_cells(r, ref) + [_f(a.get("mean_cosine"), ".5f"), _f(a.get("min_cosine"), ".4f"),
                                       _f(a.get("retrieval_top1"), ".3f"), _speed(r, "ms_per_sentence", ".2f"), speed]
                + _cost_cells(r))

    return _table(ENCODER_COLUMNS, rows, cells)


def _interval(bounds) -> str:
    """The bootstrap interval of the perplexity increase over windows, in points: "+6.9 to +9.8"."""
    if not bounds:  # absent (an older bench.json) or None (one window)
        return "—"
    lo, hi = (round(100 * b, 1) + 0.0 for b in bounds)
    return f"{lo:+.1f} to {hi:+.1f}"


def _llm_table(rows: Sequence[Row], bandwidth_gbs: float | None) -> list[str]:
    ref = _reference(rows)

    def cells(r: Row) -> list[str]:
        a = r.accuracy
        ceiling = r.ceiling_tok_s(bandwidth_gbs)
        frac = r.decode_tok_s / ceiling if ceiling and r.decode_tok_s else None
        inc = a.get("ppl_increase")
        pct = None if inc is None else round(100 * inc, 1) + 0.0  # + 0.0: FP32's -0.0 prints as +0.0
        return (_size_cells(r, ref) + [
            _f(a.get("perplexity"), ".2f"), _f(pct, "+.1f") + ("%" if pct is not None else ""),
            _interval(a.get("ppl_increase_interval")),
            _f(a.get("mean_kl"), ".4f"), _f(a.get("top1_agreement"), ".3f"), _speed(r, "prefill_tok_s", ".0f"),
            _speed(r, "decode_tok_s", ".1f"), _ratio(r.decode_tok_s, ref.decode_tok_s if ref else None),
            _f(r.decode_bytes_as_run and r.decode_bytes_as_run / 1e6, ".1f"),
            _f(r.decode_bytes_per_token and r.decode_bytes_per_token / 1e6, ".1f"), _f(ceiling, ".0f"),
            _f(frac and 100 * frac, ".0f") + ("%" if frac else "")] + _cost_cells(r))

    return _table(LLM_COLUMNS, rows, cells)


SPREAD_NOTE = ("Speeds: the median of a row's runs, then in brackets the lowest and highest of them and how many "
               "runs the outlier rule dropped (the rule is stated above the table).")
BYTES_RULE = ("MB/token: the weight bytes one decode step reads, every weight in full except a table only a Gather "
              "reads (one row per token). As run: counted over the graph ONNX Runtime runs on this CPU (its optimized "
              "model), where an FP16 weight feeding an op with no FP16 kernel here is an FP32 copy at 4 bytes per "
              "value; a GGUF as stored. As stored: counted over the file. The ceiling is bandwidth / MB as run.")


def markdown_table(rows: Sequence[Row], bandwidth_gbs: float | None = None) -> str:
    """One table per model kind present in ``rows``, with the rows' notes below it."""
    parts = []
    for kind in (ENCODER, LLM):
        group = [r for r in rows if r.kind == kind]
        if not group:
            continue
        lines = _encoder_table(group) if kind == ENCODER else _llm_table(group, bandwidth_gbs)
        notes = ([f"- {SPREAD_NOTE}"] if any(r.spread for r in group) else []) + \
            ([f"- {BYTES_RULE}"] if kind == LLM else []) + [f"- {r.name}: {r.note}" for r in group if r.note]
        parts.append("\n".join(lines + ([""] + notes if notes else [])))
    return "\n\n".join(parts) + "\n"


# ---------------------------------------------------------------------------------------------------- plots
def _accuracy_axis(kind: str) -> tuple[str, str]:
    return ("mean_cosine", "mean cosine vs FP32") if kind == ENCODER else ("ppl_increase", "perplexity increase vs FP32")


_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h")
_PEER_COLOURS = ("C0", "C1", "C2", "C4", "C5", "C6", "C7", "C8", "C9")  # C3 is tab:red, edgeq's own


def plot(rows: Sequence[Row], out_dir: Path, prefix: str = "") -> list[Path]:
    """``accuracy_vs_size.png`` per model kind, and ``decode_vs_size.png`` for LLMs (encoders: ms/sentence).
    Needs matplotlib (the ``bench`` extra); returns the files written."""
    try:
        import matplotlib
    except ImportError as exc:
        raise UserInputError("PNG plots need matplotlib", "pip install 'edgeq[bench]' (or pass --no-plots)") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for kind in (ENCODER, LLM):
        group = [r for r in rows if r.kind == kind and not r.skipped and r.size_bytes]
        if not group:
            continue
        key, label = _accuracy_axis(kind)
        speed_key, speed_label = (("decode_tok_s", "decode tokens/s (batch 1)") if kind == LLM
                                  else ("ms_per_sentence", "ms per sentence (batch 1)"))
        tag = "llm" if kind == LLM else "encoder"
        for name, ykey, ylabel, getter in (
            (f"{prefix}{tag}_accuracy_vs_size.png", key, label, lambda r: r.accuracy.get(key)),
            (f"{prefix}{tag}_speed_vs_size.png", speed_key, speed_label, lambda r: getattr(r, speed_key)),
        ):
            pts = [(r.size_bytes / 1e6, getter(r), r) for r in group if getter(r) is not None]
            if not pts:
                continue
            fig, ax = plt.subplots(figsize=(9, 4.5), dpi=110)
            peers = 0
            for x, y, r in sorted(pts, key=lambda p: p[0]):
                scale = 100 if ykey == "ppl_increase" else 1
                # a legend entry per row, not labels beside the points: rows of one size (every INT8 variant
                # is ~23 MB / ~137 MB) sit on top of each other and their labels overprinted
                style = (dict(marker="*", s=140, color="tab:red", zorder=3) if r.edgeq else
                         dict(marker=_MARKERS[peers % len(_MARKERS)], s=40, color=_PEER_COLOURS[peers % len(_PEER_COLOURS)]))
                peers += 0 if r.edgeq else 1
                ax.scatter([x], [scale * y], label=r.name, **style)
                bounds = r.accuracy.get("ppl_increase_interval") if ykey == "ppl_increase" else None
                if bounds:  # the 95% interval over windows, so a gap between two rows can be read as real or not
                    ax.errorbar([x], [scale * y], yerr=[[scale * (y - bounds[0])], [scale * (bounds[1] - y)]],
                                fmt="none", ecolor=style["color"], capsize=3, lw=1)
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
            if ykey == "ppl_increase":  # peers range from a few % to >1000%: linear near 0, log beyond 10%
                ax.set_yscale("symlog", linthresh=10)
            ax.set_xlabel("model size (MB)")
            ax.set_ylabel(ylabel + (" (%)" if ykey == "ppl_increase" else ""))
            ax.grid(alpha=0.3)
            ax.set_title(f"{tag}: {ylabel} vs size")
            fig.tight_layout()
            path = out_dir / name
            fig.savefig(path)
            plt.close(fig)
            written.append(path)
    return written


# ---------------------------------------------------------------------------------------------------- HTML / files
def render_html(rows: Sequence[Row], pngs: Sequence[Path], bandwidth_gbs: float | None, title: str) -> str:
    """One self-contained file: the table (Markdown pipes turned into an HTML table) and the plots inlined."""
    return html_page(markdown_table(rows, bandwidth_gbs), pngs, title)


def html_page(markdown: str, pngs: Sequence[Path], title: str) -> str:
    """Markdown of tables and plain lines (what ``markdown_table`` writes) as one self-contained HTML page: each
    block of pipe rows an HTML table, every other line a paragraph, the PNGs inlined."""
    body = []
    for block in markdown.split("\n\n"):
        lines = [ln for ln in block.splitlines() if ln.strip()]
        table = [ln for ln in lines if ln.startswith("|") and not ln.startswith("|---")]
        cells = [[html.escape(c.strip()) for c in ln.strip("|").split("|")] for ln in table]
        if cells:
            body.append("<table><tr>" + "".join(f"<th>{c}</th>" for c in cells[0]) + "</tr>"
                        + "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in cells[1:])
                        + "</table>")
        body += [f"<p>{html.escape(ln)}</p>" for ln in lines if not ln.startswith("|")]
    for p in pngs:
        data = base64.b64encode(Path(p).read_bytes()).decode()
        body.append(f'<img alt="{html.escape(Path(p).name)}" src="data:image/png;base64,{data}">')
    style = "body{font-family:sans-serif}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px}"
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{style}"
            f"</style></head><body><h1>{html.escape(title)}</h1>{''.join(body)}</body></html>\n")


def write_atomic(path: Path, text: str) -> Path:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def write_json(path: Path, rows: Sequence[Row], meta: dict, bandwidth_gbs: float | None) -> Path:
    return write_atomic(path, json.dumps({**meta, "rows": [r.to_dict(bandwidth_gbs) for r in rows]}, indent=1) + "\n")


# ---------------------------------------------------------------------------------------------------- packages
def package_row(package: Path, speed: bool = True) -> Row:
    """A row for an edgeq package: size and accuracy from its manifest, speed measured now on this machine."""
    from edgeq.manifest import model_path, read_manifest

    package = Path(package)
    m = read_manifest(package)
    row = Row(name=package.name, kind=m.source.kind, size_bytes=m.model_bytes(), accuracy=m.accuracy.numbers(),
              path=str(package), note=f"profile {m.profile.name}, accuracy from the manifest")
    if m.is_llm:
        from edgeq.speed import decode_bytes_as_run, decode_bytes_per_token

        row.decode_bytes_per_token = decode_bytes_per_token(model_path(package, m))
        row.decode_bytes_as_run = decode_bytes_as_run(model_path(package, m))
    if speed:
        measure_speed(row, package, m)
    return row


def measure_speed(row: Row, package: Path, manifest: Manifest, prompt_tokens: int = 128, new_tokens: int = 64,
                  sentences: int = 64) -> None:
    from edgeq.manifest import model_path
    from edgeq.safe_load import load_tokenizer
    from edgeq.speed import default_threads
    from edgeq.textdata import EVALUATION_FILE, load_texts

    row.threads = default_threads()
    texts = load_texts(EVALUATION_FILE).texts
    tokenizer = load_tokenizer(package)
    if manifest.is_llm:
        from edgeq.speed import llm_speed

        # prompt + new tokens must fit the package's context (a 128-position test model takes 64 + 64)
        from edgeq.llm.genai import check_genai_config

        context = check_genai_config(package)["model"]["context_length"]
        prompt_tokens = min(prompt_tokens, context // 2)
        ids = tokenizer("\n\n".join(texts), add_special_tokens=False, verbose=False)["input_ids"][:prompt_tokens]
        s = llm_speed(package, ids, min(new_tokens, context - prompt_tokens), threads=row.threads)
        row.prefill_tok_s, row.decode_tok_s = s.prefill_tok_s, s.decode_tok_s
    else:
        from edgeq.speed import encoder_ms_per_sentence
        from edgeq.targets import input_shape

        shape = input_shape(manifest)  # a static-shape (QNN) model takes exactly its batch x seq_len tokens
        row.ms_per_sentence = encoder_ms_per_sentence(model_path(package, manifest), tokenizer, texts[:sentences],
                                                      shape.seq_len, batch=shape.batch, threads=row.threads)


def default_report_dir(packages: Sequence[Path]) -> Path:
    """report/ beside the first package (build/report for build/PACKAGE): with the packages it compares, not in
    whatever folder the command ran from (a checkout got untracked report/ files). A package named 'report' there is
    never written into: verify refuses a package holding files its manifest does not list."""
    out = Path(packages[0]).parent / "report"
    if (out / "manifest.json").exists():
        raise UserInputError(f"{out}, where the report would go by default, is a package",
                             "pass -o a folder for the report")
    return out


def report_packages(packages: Sequence[Path], out_dir: Path, *, speed: bool = True, as_html: bool = False,
                    plots: bool = True) -> list[Path]:
    """``edgeq report``: REPORT.md (+ PNGs) or report.html in ``out_dir``; the first package is the reference row."""
    from edgeq.speed import default_threads, measure_bandwidth

    rows = [package_row(p, speed) for p in packages]
    rows[0].edgeq = True
    bw = measure_bandwidth(threads=default_threads()) if speed and any(r.kind == LLM for r in rows) else None
    gbs = bw.gbs if bw else None
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    pngs = plot(rows, out_dir) if plots or as_html else []
    meta = {"bandwidth": bw.to_dict() if bw else None, "reference_row": rows[0].name}
    written = [write_json(out_dir / "report.json", rows, meta, gbs)]
    if as_html:
        written.append(write_atomic(out_dir / "report.html", render_html(rows, pngs, gbs, "edgeq report")))
        for p in pngs:  # inlined in the HTML: one file to share
            p.unlink()
        return written
    text = "# edgeq report\n\n" + (f"Memory bandwidth {gbs:.1f} GB/s ({bw.method}).\n\n" if bw else "")
    text += "Ratios are against the first package.\n\n" + markdown_table(rows, gbs)
    text += "".join(f"\n![{p.stem}]({p.name})\n" for p in pngs)
    written.append(write_atomic(out_dir / "REPORT.md", text))
    return written + pngs
