"""edgeq.manifest_schema: the typed manifest (version 2). The recipe picks the accuracy and verification records;
every field is typed when read and named when wrong; keys the schema does not name survive a round trip."""

from __future__ import annotations

import json
import math
import re

import pytest

from edgeq.errors import PackageError
from edgeq.manifest_schema import (EncoderAccuracyRecord, LMAccuracyRecord, LMVerification, Manifest, NodeRecord,
                                   Partitions)
from manifest_samples import encoder_manifest, llm_manifest


def read(d: dict) -> Manifest:
    return Manifest.from_dict(d, "manifest.json")


def refused(d: dict, says: str) -> PackageError:
    with pytest.raises(PackageError, match=r"^manifest\.json is malformed: " + says) as err:
        read(d)
    assert "re-export" in err.value.hint and err.value.exit_code == 2
    return err.value


def test_the_recipe_picks_the_records_readers_branch_on():
    enc, lm = read(encoder_manifest()), read(llm_manifest())
    assert (enc.recipe, enc.is_llm, enc.is_qnn) == ("encoder-cpu", False, False)
    assert (lm.recipe, lm.is_llm, lm.is_qnn) == ("causal-lm", True, False)
    assert isinstance(enc.accuracy, EncoderAccuracyRecord) and enc.accuracy.retrieval_top1 == 1.0
    assert isinstance(lm.accuracy, LMAccuracyRecord) and lm.accuracy.ppl_increase_interval == (0.01, 0.07)
    assert isinstance(lm.verification, LMVerification) and lm.verification.greedy_tokens == (3, 4)
    assert enc.precision.nodes == (NodeRecord(name="fc", precision="int8", reason="a linear layer: INT8"),)
    assert lm.accuracy.numbers() == {"tokens": 256, "perplexity": 12.5, "ref_perplexity": 12.0, "ppl_increase": 0.0417,
                                     "mean_kl": 0.01, "top1_agreement": 0.9}


@pytest.mark.parametrize("make", [encoder_manifest, llm_manifest])
def test_to_dict_gives_the_json_back(make):
    d = make()
    assert read(d).to_dict() == d
    assert json.loads(json.dumps(read(d).to_dict())) == d


def test_keys_the_schema_does_not_name_are_kept_at_every_level():
    d = encoder_manifest(future_section={"a": [1, {"b": None}]})
    d["source"]["license"] = "apache-2.0"
    d["precision"]["nodes"][0]["cost_ms"] = 0.25
    d["accuracy"]["p95_cosine"] = 0.9995
    d["partitions"] = {"tool": "checker", "NNAPI": {"verdict": "NO", "as_is": {"nodes": 3, "supported_nodes": 1,
                                                                              "partitions": 1, "why": "x"},
                                                  "fixed_shapes": {"nodes": 3, "supported_nodes": 3, "partitions": 1}}}
    m = read(d)
    assert m.extra == {"future_section": {"a": [1, {"b": None}]}} and m.source.extra == {"license": "apache-2.0"}
    assert m.precision.nodes[0].extra == {"cost_ms": 0.25}
    assert m.accuracy.numbers()["p95_cosine"] == 0.9995  # a report row shows an extra number too
    assert m.partitions.checks["NNAPI"].as_is.extra == {"why": "x"} and m.partitions.tool == "checker"
    assert m.to_dict() == d


def test_a_null_interval_is_written_as_null():
    """LMAccuracy.ppl_increase_interval is None with fewer than two windows: the writer records null."""
    d = llm_manifest()
    d["accuracy"]["ppl_increase_interval"] = None
    assert read(d).accuracy.ppl_increase_interval is None and read(d).to_dict() == d


def test_empty_partitions_round_trip():
    m = read(encoder_manifest(partitions={}))
    assert m.partitions == Partitions() and m.to_dict()["partitions"] == {}


@pytest.mark.parametrize("recipe, kind", [("causal-lm", "encoder"), ("encoder-qnn", "causal-lm")])
def test_a_recipe_for_another_kind_is_refused(recipe, kind):
    d = encoder_manifest(recipe=recipe)
    d["source"]["kind"] = kind
    refused(d, rf"recipe '{recipe}' is for source\.kind '(encoder|causal-lm)', not '{kind}'")


@pytest.mark.parametrize("recipe", ["encoder", "", 3, ["causal-lm"], None])
def test_an_unknown_recipe_is_refused(recipe):
    refused(encoder_manifest(recipe=recipe), r"'recipe' must be one of encoder-cpu, encoder-qnn, causal-lm, got ")


@pytest.mark.parametrize("where, value, says", [
    ("accuracy.samples", 0, r"'accuracy\.samples' must be a positive integer, got int 0"),
    ("accuracy.samples", 2.0, r"'accuracy\.samples' must be a positive integer, got float 2\.0"),
    ("accuracy.mean_cosine", math.inf, r"'accuracy\.mean_cosine' must be a finite number, got float inf"),
    ("accuracy.mean_cosine", "0.99", r"'accuracy\.mean_cosine' must be a finite number, got str \"0\.99\""),
    ("size.checked", "yes", r"'size\.checked' must be true or false, got str"),
    ("precision.summary", {"linear": {"int8": "1"}}, r"'precision\.summary\['linear'\]\['int8'\]' must be an integer"),
    ("precision.nodes", [{"name": "fc", "precision": "int8"}], r"'precision\.nodes\[0\]\.reason' must be a string, "
                                                                r"got missing"),
    ("verification.inputs", {"input_ids": [[1]]}, r"'verification\.inputs\.attention_mask' must be a list, got "
                                                  r"missing"),
    ("model.batch_size", -1, r"'model\.batch_size' must be a positive integer, got int -1"),
    ("source.weight_files", "model.safetensors", r"'source\.weight_files' must be a list, got str"),
])
def test_a_field_of_the_wrong_type_is_named(where, value, says):
    d = encoder_manifest()
    section, key = where.split(".")
    d[section][key] = value
    refused(d, says)


def test_a_static_shape_records_both_batch_size_and_seq_len():
    d = encoder_manifest()
    d["model"]["batch_size"] = 2
    refused(d, r"'model\.seq_len' must be a positive integer \(a static shape records batch_size and seq_len\), got "
               r"missing")
    d["model"] = {"file": "model.ort", "seq_len": 64}
    refused(d, r"'model\.batch_size' must be a positive integer")
    d["model"]["batch_size"] = 2
    assert (read(d).model.batch_size, read(d).model.seq_len) == (2, 64)


def test_a_size_needs_a_ratio_with_its_bounds_or_a_cap():
    d = encoder_manifest(size={"model_bytes": 10})
    refused(d, r"'size\.max_mb' must be a finite number \(or size\.ratio\), got missing")
    refused(encoder_manifest(size={"model_bytes": 10, "ratio": 0.5}), r"'size\.fp32_onnx_bytes' must be a finite")


def test_a_qnn_section_must_hold_the_context_models_run():
    on_htp = {"QNNExecutionProvider": 3}
    runs = {"model.onnx": {"placement": {"nodes": on_htp, "partitions": {"QNNExecutionProvider": 1}},
                           "accuracy_vs_fp32": {"samples": 2, "mean_cosine": 1.0, "min_cosine": 1.0,
                                                "retrieval_top1": 1.0}}}
    qnn = {"soc_model": 57, "htp_arch": 75, "context": {"file": "model_ctx.onnx"},
           "simulator": {"cpu_ep_fallback": "disabled", "runs": runs}}
    d = encoder_manifest(recipe="encoder-qnn", qnn=qnn)
    refused(d, re.escape("'qnn.simulator.runs['model_ctx.onnx']' must be an object, got missing"))
    runs["model_ctx.onnx"] = runs["model.onnx"]
    assert read(d).qnn.simulator.runs["model_ctx.onnx"].placement.nodes == on_htp
    qnn["context"]["file"] = "../ctx.onnx"
    with pytest.raises(PackageError, match=r"qnn\.context\.file '\.\./ctx\.onnx' is not a plain path"):
        read(d)


def test_a_gguf_file_must_be_a_file_name():
    d = llm_manifest()
    d["source"]["gguf_file"] = "sub/model.gguf"
    refused(d, r"source\.gguf_file 'sub/model\.gguf' is not a file name")


def test_the_profile_as_applied_gives_any_recorded_value_typed_or_not():
    """verify tightens its bars from these (a non-number tightens nothing, so the schema does not refuse one)."""
    d = encoder_manifest()
    d["profile"]["values"].update(package={"verify_max_rel_diff": 0.002}, llm=None)
    d["profile"]["values"]["accuracy"].update(min_mean_cosine=0.995, min_min_cosine="high")
    values = read(d).profile.values
    assert values.recorded("package", "verify_max_rel_diff") == 0.002
    assert values.recorded("accuracy", "eval_seq_len") == 128 and values.recorded("accuracy", "min_mean_cosine") == 0.995
    assert values.recorded("accuracy", "min_min_cosine") == "high"
    assert values.recorded("llm", "verify_tokens") is None and values.recorded("package", "verify_samples") is None
