"""edgeq.manifest_migrate on STORED schema-1 manifests: tests/data/manifests_v1/ holds the manifests of three real
packages exported with the edgeq of commit b412430 (the last to write schema 1), untrimmed: a tiny random BERT for
android-arm64 (encoder-cpu) and android-qnn-htp (encoder-qnn, onnxruntime-qnn's HTP simulator), and a tiny random
Llama for android-arm64 (causal-lm, settings as that commit's tests/llm/test_chain.py, now
tests/recipes/test_causal_lm.py). Each must read through the one reader, migrate to the current schema with nothing
lost, and show in ``edgeq inspect``."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgeq.cli import main
from edgeq.errors import PackageError
from edgeq.manifest import MANIFEST, SCHEMA_VERSION, Manifest, read_manifest
from edgeq.manifest_migrate import READABLE, migrate
from edgeq.manifest_schema import (EncoderAccuracyRecord, EncoderVerification, LMAccuracyRecord, LMVerification,
                                   QnnRecord)

STORED = Path(__file__).parent / "data" / "manifests_v1"
RECIPES = {"encoder-cpu": False, "encoder-qnn": False, "causal-lm": True}  # file stem (its recipe) -> is_llm


def stored(recipe: str) -> dict:
    return json.loads((STORED / f"{recipe}.json").read_text())


def package_of(manifest: dict, folder: Path) -> Path:
    """A folder holding only the manifest: read_manifest reads nothing else (verify checks the files)."""
    folder.mkdir()
    (folder / MANIFEST).write_text(json.dumps(manifest))
    return folder


@pytest.mark.parametrize("recipe", RECIPES)
def test_a_stored_v1_manifest_reads_as_its_recipe(recipe, tmp_path):
    old = stored(recipe)
    assert old["schema_version"] == 1 and "recipe" not in old
    m = read_manifest(package_of(old, tmp_path / "pkg"))
    assert m.schema_version == SCHEMA_VERSION == 2
    assert m.recipe == recipe and m.is_llm == RECIPES[recipe] and m.is_qnn == (recipe == "encoder-qnn")
    if m.is_llm:
        assert isinstance(m.accuracy, LMAccuracyRecord) and isinstance(m.verification, LMVerification)
        assert m.accuracy.perplexity == old["accuracy"]["perplexity"] and m.accuracy.tokens == 2032
        assert m.profile.values.llm.window_tokens == 128 and m.tokenizer.add_bos_token is True
    else:
        assert isinstance(m.accuracy, EncoderAccuracyRecord) and isinstance(m.verification, EncoderVerification)
        assert m.accuracy.mean_cosine == old["accuracy"]["mean_cosine"] and m.accuracy.samples == 320
        assert m.profile.values.accuracy.eval_seq_len == 128
    assert isinstance(m.qnn, QnnRecord) == (recipe == "encoder-qnn")
    assert m.source_name == old["source"]["name"]
    assert m.model_bytes() == sum(e["size"] for n, e in old["files"].items() if n.startswith("model."))


@pytest.mark.parametrize("recipe", RECIPES)
def test_migration_adds_the_recipe_and_loses_nothing(recipe):
    old = stored(recipe)
    new = migrate(old, "stored")
    assert new == {**old, "schema_version": 2, "recipe": recipe}
    assert old["schema_version"] == 1 and "recipe" not in old  # the input is not changed
    assert Manifest.from_dict(new, "stored").to_dict() == new  # every key kept, typed or extra


@pytest.mark.parametrize("recipe", RECIPES)
def test_a_v2_round_trip_is_the_identity(recipe, tmp_path):
    """read -> to_dict -> write -> read gives the same record and the same JSON, byte for byte."""
    first = read_manifest(package_of(stored(recipe), tmp_path / "a"))
    text = json.dumps(first.to_dict(), indent=1)
    second = read_manifest(package_of(json.loads(text), tmp_path / "b"))
    assert second == first
    assert json.dumps(second.to_dict(), indent=1) == text


def test_an_older_manifest_naming_its_source_by_path_gets_the_folder_name(tmp_path):
    """Before manifests dropped local paths, ``source.path`` named the source folder; v2 names it by ``name``
    and keeps the path (an old package's rebuild and eval find the source there)."""
    old = stored("encoder-cpu")
    del old["source"]["name"]
    old["source"]["path"] = "/home/someone/models/tiny-bert"
    m = read_manifest(package_of(old, tmp_path / "pkg"))
    assert m.source.name == "tiny-bert" and m.source.path == "/home/someone/models/tiny-bert"
    assert migrate(old, "x")["source"]["name"] == "tiny-bert"
    windows = {**old, "source": {**old["source"], "path": "C:\\Users\\someone\\tiny-bert"}}
    assert migrate(windows, "x")["source"]["name"] == "tiny-bert"


@pytest.mark.parametrize("recipe, shows", [
    ("encoder-cpu", r"accuracy vs FP32 on 320 held-back texts: mean cosine 1\.00000, min cosine 1\.00000, "
                    r"retrieval top-1 agreement 0\.994\nNNAPI NO: takes 45/159 nodes in 5 partitions"),
    ("encoder-qnn", r"qnn      soc_model 57 \(Hexagon v75\), model_ctx\.onnx: 279 of 279 nodes on HTP"),
    ("causal-lm", r"accuracy vs FP32 on 2032 held-back tokens: perplexity 575618\.147 vs 600265\.754 \(-4\.11%; "
                  r"95% over windows -7\.2% to -0\.4%\)"),
])
def test_inspect_shows_a_stored_v1_package(recipe, shows, tmp_path):
    result = CliRunner().invoke(main, ["inspect", str(package_of(stored(recipe), tmp_path / "pkg"))])
    assert result.exit_code == 0, result.output
    assert re.search(shows, result.stdout), result.stdout
    assert re.search(r"^source   tiny-(bert|llama) \((BertModel|LlamaForCausalLM)\)$", result.stdout, re.M)


def test_an_encoder_v1_manifest_without_an_execution_provider_is_told_by_its_qnn_section():
    old = stored("encoder-qnn")
    del old["model"]["execution_provider"]
    assert migrate(old, "x")["recipe"] == "encoder-qnn"
    old = stored("encoder-cpu")
    del old["model"]["execution_provider"]
    assert migrate(old, "x")["recipe"] == "encoder-cpu"


@pytest.mark.parametrize("version", [0, 3, True, "1", 1.0, None])
def test_a_version_this_edgeq_does_not_read_is_refused(version):
    with pytest.raises(PackageError, match=rf"schema_version {re.escape(repr(version))}, this edgeq reads 1, 2 "
                                           r"\(the current one is 2\)") as err:
        migrate({**stored("encoder-cpu"), "schema_version": version}, "x")
    assert "re-export" in err.value.hint
    assert READABLE == (1, 2)


@pytest.mark.parametrize("change, says", [
    (lambda m: m.update(source="bert"), r"'source' must be an object, got str \"bert\""),
    (lambda m: m["source"].pop("kind"), r"'source.kind' must be a string, got missing"),
    (lambda m: m["source"].update(kind=["encoder"]), r"'source.kind' must be a string, got list"),
    (lambda m: m.update(model=None), r"'model' must be an object, got NoneType null"),
])
def test_a_malformed_v1_manifest_is_named_after_migration(change, says, tmp_path):
    """The migration trusts nothing: where a field it reads is missing or wrong it leaves it, and the typed reader
    names it."""
    old = stored("encoder-cpu")
    change(old)
    with pytest.raises(PackageError, match=r"manifest\.json is malformed: " + says) as err:
        read_manifest(package_of(old, tmp_path / "pkg"))
    assert "re-export" in err.value.hint
