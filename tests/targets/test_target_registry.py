"""edgeq.targets: the registry verify, --on, make device-test and report read, and the shapes packages take."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgeq.errors import PackageError, UserInputError
from edgeq.manifest_schema import Manifest
from edgeq.targets import TARGETS, device_for, get_target, input_shape, static_batches
from manifest_samples import encoder_manifest, qnn_manifest


def typed(d: dict) -> Manifest:
    return Manifest.from_dict(d, "manifest.json")


def test_every_registered_target_names_itself_and_what_it_runs_on():
    assert list(TARGETS) == ["host", "arm64", "qnn-htp"]
    for name, target in TARGETS.items():
        assert target.name == name and target.runs_on and target.model_kinds
        assert get_target(name) is target


def test_an_unknown_target_is_refused_with_the_known_names():
    with pytest.raises(UserInputError, match="unknown verification target 'pixel-8'") as exc:
        get_target("pixel-8")
    assert exc.value.hint == "targets available: host, arm64, qnn-htp"


@pytest.mark.parametrize("provider, device", [("QNNExecutionProvider", "qnn-htp"), ("CPUExecutionProvider", "arm64"),
                                              (None, "arm64")])
def test_a_package_goes_to_the_device_its_profile_targets(provider, device):
    assert device_for(provider).name == device


def test_static_shape_packages_take_their_rows_batch_by_batch():
    cpu, qnn = typed(encoder_manifest()), typed(qnn_manifest())
    assert (input_shape(cpu).seq_len, input_shape(cpu).batch, input_shape(cpu).padding) == (128, None, True)
    assert (input_shape(qnn).seq_len, input_shape(qnn).batch, input_shape(qnn).padding) == (64, 2, "max_length")
    feeds = {"input_ids": np.arange(12).reshape(4, 3), "attention_mask": np.ones((4, 3))}
    assert [b["input_ids"].tolist() for b in static_batches(feeds, 2)] == [[[0, 1, 2], [3, 4, 5]], [[6, 7, 8], [9, 10, 11]]]
    assert len(static_batches(feeds, None)) == 1


def test_qnn_htp_takes_the_soc_from_the_manifest_and_the_profile_as_the_default():
    from edgeq.profiles import load_profile

    target = get_target("qnn-htp")
    spec = load_profile("android-qnn-htp").qnn
    recorded = qnn_manifest()
    recorded["qnn"].update(soc_model=43, htp_arch=73)
    assert target.soc(typed(recorded)) == (43, 73)
    assert target.soc(typed(qnn_manifest(qnn=None))) == (spec.soc_model, spec.htp_arch)
    recorded["qnn"]["soc_model"] = "57; rm -rf"
    with pytest.raises(PackageError, match=r"'qnn\.soc_model' must be an integer, got str"):  # the schema's check
        typed(recorded)


def test_qnn_htp_refuses_a_package_without_a_context_model_and_causal_lms(tmp_path):
    target = get_target("qnn-htp")
    with pytest.raises(UserInputError, match="has no EPContext model"):
        target.check_package(tmp_path, typed(encoder_manifest()))
    with pytest.raises(UserInputError, match="has no EPContext model"):  # an encoder-qnn manifest that lost it
        target.check_package(tmp_path, typed(qnn_manifest(model={"file": "model.onnx"})))
    target.check_package(tmp_path, typed(qnn_manifest()))
    with pytest.raises(UserInputError, match="runs encoder packages only"):
        target.greedy_tokens(tmp_path, [1, 2], 4)


def test_targets_command_lists_the_registry_or_a_package_s_device(tmp_path):
    from cli_results import edgeq
    from manifest_samples import encoder_manifest

    listed = edgeq("targets")
    lines = listed.output.splitlines()
    assert listed.exit_code == 0 and [line.split()[0] for line in lines if not line.startswith(" ")] == list(TARGETS)
    assert max(map(len, lines)) <= 100
    missing = edgeq("targets", str(tmp_path / "nope"))
    assert missing.exit_code == 2 and "Traceback" not in missing.output
    assert "error: package folder" in missing.output and "hint: " in missing.output
    for provider, device in (("QNNExecutionProvider", "qnn-htp"), ("CPUExecutionProvider", "arm64")):
        manifest = encoder_manifest()
        manifest["model"]["execution_provider"] = provider
        (tmp_path / "manifest.json").write_text(json.dumps(manifest))
        assert edgeq("targets", str(tmp_path)).output.strip() == device
    (tmp_path / "manifest.json").write_text(json.dumps({"not": "a manifest"}))
    assert edgeq("targets", str(tmp_path)).exit_code == 2
