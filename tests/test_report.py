"""``edgeq report`` on a tiny encoder package, and the report's tables and decode-bytes rule on hand-made inputs.
Speeds are measured but never asserted on (timings belong in bench/)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from edgeq.cli import main
from edgeq.report import ENCODER, LLM, Row, markdown_table
from edgeq.speed import graph_decode_bytes, measure_bandwidth, onnx_decode_bytes, onnx_decode_bytes_as_run


def edgeq(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def package(tiny_bert_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report-pkg")
    result = edgeq("export", tiny_bert_dir, "--profile", "android-arm64", "-o", out, "--samples", 16, "-q")
    assert result.exit_code == 0, result.output
    return out / "tiny-bert-android-arm64"


@pytest.mark.encoders
def test_report_writes_markdown_json_and_plots(package, tmp_path):
    manifest = json.loads((package / "manifest.json").read_text())
    result = edgeq("report", package, package, "-o", tmp_path)
    assert result.exit_code == 0, result.output
    names = {p.name for p in tmp_path.iterdir()}
    assert {"REPORT.md", "report.json", "encoder_accuracy_vs_size.png", "encoder_speed_vs_size.png"} <= names
    text = (tmp_path / "REPORT.md").read_text()
    rows = [ln for ln in text.splitlines() if ln.startswith("| tiny-bert-android-arm64 |")]
    assert len(rows) == 2
    assert f"{manifest['accuracy']['mean_cosine']:.5f}" in rows[0]
    assert "1.00x" in rows[1]  # the same package against itself
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["rows"][0]["ms_per_sentence"] > 0
    assert data["rows"][0]["size_bytes"] == manifest["files"]["model.ort"]["size"]
    for png in ("encoder_accuracy_vs_size.png", "encoder_speed_vs_size.png"):
        assert (tmp_path / png).read_bytes().startswith(b"\x89PNG")
        assert f"]({png})" in text


@pytest.mark.encoders
def test_report_html_is_one_file(package, tmp_path):
    result = edgeq("report", package, "-o", tmp_path, "--html", "--no-speed")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html", "report.json"]
    page = (tmp_path / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 1  # accuracy vs size; no speed measured, no speed plot
    assert "<td>tiny-bert-android-arm64</td>" in page


@pytest.mark.encoders
def test_report_on_an_android_qnn_htp_package_measures_it_at_its_static_shape(tiny_bert_dir, package, tmp_path):
    """The QNN package's model.onnx takes exactly 1 x 64 tokens; report used to feed it unpadded sentences and crash.
    Its row is beside the CPU package's (first, the reference) with the QNN manifest's numbers."""
    pytest.importorskip("onnxruntime_qnn", reason="edgeq[qnn] is not installed (make setup installs it)")
    out = tmp_path / "pkgs"
    result = edgeq("export", tiny_bert_dir, "--profile", "android-qnn-htp", "-o", out, "--samples", 16, "-q")
    assert result.exit_code == 0, result.output
    qnn = out / "tiny-bert-android-qnn-htp"
    manifest = json.loads((qnn / "manifest.json").read_text())
    result = edgeq("report", package, qnn, "-o", tmp_path / "report", "--no-plots")
    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    data = json.loads((tmp_path / "report" / "report.json").read_text())
    row = next(r for r in data["rows"] if r["name"] == qnn.name)
    assert row["ms_per_sentence"] > 0
    assert row["size_bytes"] == manifest["files"]["model.onnx"]["size"]  # report counts model.* files
    assert row["accuracy"]["mean_cosine"] == manifest["accuracy"]["mean_cosine"]
    line = next(ln for ln in (tmp_path / "report" / "REPORT.md").read_text().splitlines()
                if ln.startswith(f"| {qnn.name} |"))
    assert f"{manifest['accuracy']['mean_cosine']:.5f}" in line and f"{row['ms_per_sentence']:.2f}" in line


@pytest.mark.encoders
def test_report_without_o_writes_beside_the_packages_not_in_the_working_folder(package, tmp_path, monkeypatch):
    import shutil

    build = tmp_path / "build"
    copy = Path(shutil.copytree(package, build / package.name))
    cwd = tmp_path / "checkout"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    result = edgeq("report", copy, "--no-speed", "--no-plots")
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [f"wrote {build / 'report' / 'report.json'}",
                                          f"wrote {build / 'report' / 'REPORT.md'}"]
    assert sorted(p.name for p in build.iterdir()) == ["report", package.name]
    assert not any(cwd.iterdir())
    assert edgeq("verify", copy).exit_code == 0  # the package itself is untouched


def test_report_without_o_never_writes_into_a_package_named_report(tmp_path):
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "manifest.json").write_text("{}")
    (tmp_path / "pkg").mkdir()
    from edgeq.errors import UserInputError
    from edgeq.report import default_report_dir

    with pytest.raises(UserInputError, match="where the report would go by default, is a package"):
        default_report_dir([tmp_path / "pkg"])


def test_report_on_a_folder_that_is_not_a_package(tmp_path):
    result = edgeq("report", tmp_path, "-o", tmp_path / "out")
    assert result.exit_code == 2  # a user mistake
    assert re.search(r"^error: .*has no manifest\.json$", result.stderr, re.M)
    assert not (tmp_path / "out").exists()


def test_llm_table_ratios_ceiling_and_skipped_rows():
    rows = [Row("edgeq", LLM, 100_000_000, {"perplexity": 11.0, "ppl_increase": 0.1, "mean_kl": 0.05,
                                            "top1_agreement": 0.9}, decode_tok_s=50.0, decode_bytes_per_token=60_000_000,
                decode_bytes_as_run=80_000_000, edgeq=True, threads=2, peak_rss_mb=900.0, run_peak_rss_mb=300.0,
                spread={"decode_tok_s": {"median": 50.0, "low": 48.0, "high": 51.5, "kept": 3, "dropped": 1}}),
            Row("peer", LLM, 200_000_000, {"perplexity": 12.0, "ppl_increase": 0.2, "mean_kl": 0.1,
                                           "top1_agreement": 0.8, "ppl_increase_interval": [0.17, 0.234]},
                decode_tok_s=25.0, decode_bytes_per_token=160_000_000),
            Row("llama.cpp Q4_0", LLM, skipped="llama-cpp-python is not installed")]
    table = markdown_table(rows, bandwidth_gbs=8.0)
    edgeq_line, peer_line, skipped_line = [ln for ln in table.splitlines() if ln.startswith("| ") and "---" not in ln][1:]
    # the ceiling is from the bytes as run: 8 GB/s / 80 MB = 100 tok/s; 50 measured. Both byte counts are shown.
    assert "| 80.0 | 60.0 | 100 | 50% |" in edgeq_line
    assert "| 50.0 (48.0 to 51.5, 1 dropped) |" in edgeq_line  # the median, the kept runs' range, the dropped runs
    assert edgeq_line.endswith("| 2 | — | 900 | 300 |")  # threads, build s, build and run peak RSS
    assert "| 2.00x |" in peer_line and "| 0.50x |" in peer_line and "+20.0%" in peer_line
    assert "| — | 160.0 | — | — |" in peer_line  # stored bytes only: no ceiling is claimed from them
    assert "| +17.0 to +23.4 |" in peer_line and "| — |" in edgeq_line  # the edgeq row has no interval stored
    assert "skipped: llama-cpp-python is not installed" in skipped_line
    assert "As run: counted over the graph ONNX Runtime runs on this CPU" in table  # the rule, stated under the table
    assert rows[0].to_dict(8.0)["fraction_of_ceiling"] == pytest.approx(0.5)
    assert Row.from_dict(rows[0].to_dict(8.0)) == rows[0] and Row.from_dict(rows[1].to_dict(8.0)) == rows[1]


def test_encoder_table_without_an_edgeq_row_has_no_ratios():
    table = markdown_table([Row("a", ENCODER, 1_000_000, {"mean_cosine": 0.99, "min_cosine": 0.9,
                                                          "retrieval_top1": 0.95}, ms_per_sentence=2.0)])
    assert "| a | 1.0 | — | 0.99000 | 0.9000 | 0.950 | 2.00 | — |" in table


def _graph(nodes, inits, tmp_path: Path) -> Path:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 8])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_decode_bytes_count_one_embedding_row_and_every_weight(tmp_path):
    table = np.zeros((100, 8), np.float16)  # 1600 bytes, 16 per row
    w = np.zeros((8, 8), np.float32)  # 256 bytes
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e16"]),
             helper.make_node("Cast", ["e16"], ["e"], to=TensorProto.FLOAT),
             helper.make_node("MatMul", ["e", "w"], ["y"])]
    assert onnx_decode_bytes(_graph(nodes, {"table": table, "w": w}, tmp_path)) == 16 + 256
    # tied: the head reads the whole table every token
    nodes += [helper.make_node("Transpose", ["table"], ["tT"], perm=[1, 0])]
    assert onnx_decode_bytes(_graph(nodes, {"table": table, "w": w}, tmp_path)) == 1600 + 256


def _tied_fp16(tmp_path: Path) -> Path:
    """An FP16 table [100, 8] looked up by Gather and read whole by the head's MatMul (a tied LM head)."""
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e16"]),
             helper.make_node("Transpose", ["table"], ["tT"], perm=[1, 0]),
             helper.make_node("MatMul", ["e16", "tT"], ["y16"]),
             helper.make_node("Cast", ["y16"], ["y"], to=TensorProto.FLOAT)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 100])],
                              [numpy_helper.from_array(np.ones((100, 8), np.float16), "table")])
    path = tmp_path / "tied.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_decode_bytes_as_run_count_the_fp32_copy_of_an_fp16_head(tmp_path):
    path = _tied_fp16(tmp_path)
    assert onnx_decode_bytes(path) == 1600  # as stored: the FP16 table, once, in full
    # As run on x86: the CPU EP has no FP16 MatMul, so ONNX Runtime casts the head's weight to an FP32 [8, 100] copy
    # at load (3200 bytes read every token) while the Gather keeps reading 16-byte FP16 rows.
    assert onnx_decode_bytes_as_run(path) == 3200 + 16


@pytest.mark.parametrize("op, inits, stored, copy", [
    # FP16 [8, 8]: 128 bytes; an FP32 copy of 256 bytes every token
    ("Cast", [numpy_helper.from_array(np.ones((8, 8), np.float16), "w")], 128, 256),
    # int8 [8, 8] + an FP32 scale: 64 + 4 bytes; the dequantized FP32 copy 256
    ("DequantizeLinear", [numpy_helper.from_array(np.ones((8, 8), np.int8), "w"),
                          numpy_helper.from_array(np.array(0.1, np.float32), "s")], 68, 256),
])
def test_decode_bytes_as_run_count_a_per_token_copy_of_a_weight_at_its_output_type(op, inits, stored, copy):
    node = (helper.make_node("Cast", ["w"], ["w32"], to=TensorProto.FLOAT) if op == "Cast" else
            helper.make_node("DequantizeLinear", ["w", "s"], ["w32"]))
    graph = helper.make_graph([node, helper.make_node("MatMul", ["x", "w32"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])], inits)
    assert graph_decode_bytes(graph) == stored  # as stored: the file's bytes
    assert graph_decode_bytes(graph, run_copies=True) == stored + copy  # as run: the copy is written and read


def test_bandwidth_is_positive_and_says_how_it_was_measured():
    bw = measure_bandwidth(mb=8, repeats=2)
    assert bw.gbs > 0 and "best of 2" in bw.method and "one thread" in bw.method
    two = measure_bandwidth(mb=8, repeats=2, threads=2)
    assert two.gbs > 0 and "2 threads" in two.method
