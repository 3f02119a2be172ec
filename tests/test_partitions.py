"""edgeq.partitions: the usability checker's partition estimate per EP, on a small hand-made encoder."""

from __future__ import annotations

import onnx
import pytest
from onnx import helper

from edgeq.errors import EdgeqError
from edgeq.partitions import PARTITION_EPS, _explicit_transpose_perms, partition_report
from tiny_models import tiny_onnx_encoder


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return tiny_onnx_encoder(tmp_path_factory.mktemp("partitions") / "tiny.onnx")


def test_report_has_every_requested_ep_with_counts_and_verdict(encoder):
    report = partition_report(encoder, PARTITION_EPS)
    assert set(report) == {"tool", *PARTITION_EPS}
    n = len(onnx.load(str(encoder)).graph.node)
    for ep in PARTITION_EPS:
        r = report[ep]
        assert r["verdict"].split()[0] in ("YES", "MAYBE", "NO")
        for shapes in ("as_is", "fixed_shapes"):
            s = r[shapes]
            assert s["nodes"] == n and 0 <= s["supported_nodes"] <= n
            assert s["partitions"] >= (1 if s["supported_nodes"] else 0)
        # fixing the input shapes can only let an EP take more nodes
        assert r["fixed_shapes"]["supported_nodes"] >= r["as_is"]["supported_nodes"]


def test_no_eps_no_report(encoder):
    assert partition_report(encoder, ()) == {}


def test_unknown_ep_is_refused(encoder):
    with pytest.raises(EdgeqError, match="no partition check for 'QNN'"):
        partition_report(encoder, ("QNN",))


def test_transpose_without_perm_gets_the_default_perm():
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3, 4])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)
    model = helper.make_model(helper.make_graph([helper.make_node("Transpose", ["x"], ["y"])], "t", [x], [y]))
    _explicit_transpose_perms(model)
    assert list(model.graph.node[0].attribute[0].ints) == [2, 1, 0]
