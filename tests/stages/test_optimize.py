"""edgeq.stages.optimize: ORT basic-level clean-up of the tiny BERT's export, named nodes, same outputs."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from edgeq.categories import CATEGORIES
from edgeq.modelsource import inspect_model_dir
from edgeq.runtime import encode, session
from edgeq.stages.export import export
from edgeq.stages.optimize import OptimizedModel, optimize
from edgeq.textdata import EVALUATION_FILE, load_texts

pytestmark = pytest.mark.encoders  # every test here exports through optimum-onnx

# Measured: the optimized graph's last_hidden_state equals the export's bit for bit (max |diff| 0.0) on 16
# evaluation texts; basic level only folds constants and shape arithmetic and removes Identity nodes, no float
# arithmetic is reordered. 1e-6 (about 2 float32 ulps at the outputs' magnitude ~3.6) allows ORT to pick another
# kernel for a folded shape and still catches any real change of the computation.
ATOL = 1e-6


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("optimize-work")


@pytest.fixture(scope="module")
def exported(tiny_bert_dir, workdir):
    return export(inspect_model_dir(tiny_bert_dir), workdir)


@pytest.fixture(scope="module")
def exported_bytes(exported) -> bytes:
    return exported.onnx_path.read_bytes()  # read before optimize() runs


@pytest.fixture(scope="module")
def optimized(exported, exported_bytes, workdir) -> OptimizedModel:
    return optimize(exported, workdir)


@pytest.fixture(scope="module")
def model(optimized) -> onnx.ModelProto:
    return optimized.load()


def test_writes_optimized_onnx_and_removes_the_raw_file(optimized, exported, exported_bytes, workdir):
    assert optimized.onnx_path == workdir / "optimized.onnx" and optimized.onnx_path.is_file()
    assert not (workdir / "optimized.raw.onnx").exists()
    assert optimized.exported is exported
    assert exported.onnx_path.read_bytes() == exported_bytes  # the export is not modified
    onnx.checker.check_model(optimized.load(), full_check=True)


def test_outputs_equal_the_export(optimized, exported):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(exported.tokenizer_dir), local_files_only=True)
    texts = load_texts(EVALUATION_FILE).head(16)
    feeds = encode(tokenizer, texts, 128, list(exported.input_names))
    assert not feeds["attention_mask"].all()  # padded batch: the mask path is exercised
    off = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # compare the two graphs as written
    (want,) = session(exported.onnx_path, optimization=off).run(None, feeds)
    (got,) = session(optimized.onnx_path, optimization=off).run(None, feeds)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)


def test_same_inputs_and_outputs(model, exported):
    assert tuple(i.name for i in model.graph.input) == exported.input_names
    assert tuple(o.name for o in model.graph.output) == exported.output_names


def test_every_node_has_a_unique_non_empty_name(model):
    names = [n.name for n in model.graph.node]
    assert all(names)
    assert len(names) == len(set(names)), [n for n, c in Counter(names).items() if c > 1]


def test_only_default_domain_ops(model):
    """Basic level adds no fused contrib ops (no com.microsoft Attention, SkipLayerNormalization, ...)."""
    assert {n.domain for n in model.graph.node} <= {"", "ai.onnx"}
    # (opset_import is no evidence: ORT's saved model imports every domain it knows, used or not.)
    ops = {n.op_type for n in model.graph.node}
    assert not ops & {"Attention", "SkipLayerNormalization", "FusedMatMul", "BiasGelu", "FastGelu"}
    assert "LayerNormalization" in ops and "Softmax" in ops  # still the plain ops


def test_basic_level_folded_constants(model, exported):
    before = Counter(n.op_type for n in onnx.load(str(exported.onnx_path)).graph.node)
    after = Counter(n.op_type for n in model.graph.node)
    assert before["Constant"] > 0 and before["Identity"] > 0  # the export has them ...
    assert after["Constant"] == 0 and after["Identity"] == 0  # ... the optimized graph does not
    assert sum(after.values()) < sum(before.values())


def test_nodes_dict_covers_every_node(optimized, model):
    assert list(optimized.nodes) == [n.name for n in model.graph.node]
    for n in model.graph.node:
        info = optimized.nodes[n.name]
        assert info.name == n.name and info.op_type == n.op_type
        assert info.category in CATEGORIES
    assert Counter(i.category for i in optimized.nodes.values())["linear"] == 12  # 6 per layer, 2 layers
