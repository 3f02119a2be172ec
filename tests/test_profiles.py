"""edgeq.profiles: loading the bundled profile, and every way a profile file can be wrong."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
import tomllib
import typing

import pytest

from edgeq.errors import ProfileError, UserInputError
from edgeq.profiles import (
    PROFILES_DIR,
    AccuracyBudget,
    LLMSpec,
    PackageSpec,
    Profile,
    QuantizationSpec,
    describe_fields,
    known_profiles,
    load_profile,
    parse_setting,
)

BUNDLED = PROFILES_DIR / "android-arm64.toml"

MINIMAL = 'name = "t"\ndescription = "test profile"\ntarget = "test target"\n'


def write(tmp_path, text: str, name: str = "custom.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def bundled_with(old: str, new: str) -> str:
    """The bundled profile's text with one exact line replaced (fails loudly if the line is not there)."""
    text = BUNDLED.read_text()
    assert text.count(old) == 1, f"{old!r} is not exactly once in {BUNDLED}"
    return text.replace(old, new)


# --- the bundled profile -------------------------------------------------------------------------------------------


def test_bundled_profile_is_listed():
    assert known_profiles()["android-arm64"] == BUNDLED


def test_bundled_profile_loads_with_its_values():
    p = load_profile("android-arm64")
    assert isinstance(p, Profile)
    assert p.name == "android-arm64"
    assert p.execution_provider == "CPUExecutionProvider"
    assert p.model_kinds == ("encoder", "causal-lm")
    assert p.quantization.activation_type == "uint8"
    assert p.quantization.calibration_method == "percentile"
    assert p.quantization.calibration_percentile == 99.999
    assert p.quantization.keep_fp16 == ("embedding",)
    assert p.quantization.keep_fp32_nodes == ()
    assert p.package.device_min_cosine == 0.999 and p.package.matmulnbits_accuracy_level == 4
    assert p.package.partition_check_eps == ("NNAPI",) and p.status == "supported"
    assert p.package.target_platform == "arm"
    assert p.accuracy.min_mean_cosine == 0.995
    assert p.source == str(BUNDLED)
    assert p.sha256 == hashlib.sha256(BUNDLED.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    "target, field, value",
    [
        ("profile", "name", "other"),
        ("quantization", "calibration_method", "minmax"),
        ("package", "zip", False),
        ("accuracy", "min_mean_cosine", 0.0),
    ],
)
def test_bundled_profile_is_frozen(target, field, value):
    p = load_profile("android-arm64")
    obj = p if target == "profile" else getattr(p, target)
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(obj, field, value)
    assert getattr(obj, field) != value


def test_list_fields_are_tuples_so_the_profile_is_hashable():
    p = load_profile("android-arm64")
    assert isinstance(p.quantization.keep_fp16, tuple)
    hash(p)  # raises TypeError if any field is a list


# --- unknown profile names -----------------------------------------------------------------------------------------


def test_unknown_profile_lists_known_profiles():
    with pytest.raises(ProfileError, match=r"unknown profile 'ios-coreml'") as exc:
        load_profile("ios-coreml")
    assert re.search(r"known profiles: .*\bandroid-arm64\b", exc.value.hint)
    assert ".toml" in exc.value.hint
    assert isinstance(exc.value, UserInputError) and exc.value.exit_code == 2


def test_unknown_profile_suggests_close_name():
    with pytest.raises(ProfileError, match=r"unknown profile 'android-arm46'") as exc:
        load_profile("android-arm46")
    assert exc.value.hint.startswith("did you mean 'android-arm64'? known profiles: ")


def test_unknown_profile_in_empty_profiles_dir(tmp_path):
    with pytest.raises(ProfileError) as exc:
        load_profile("android-arm64", profiles_dir=tmp_path)
    assert "(none)" in exc.value.hint


def test_missing_toml_path_is_reported_as_a_missing_file(tmp_path):
    missing = tmp_path / "nope.toml"
    with pytest.raises(ProfileError, match=re.escape(f"profile file {missing} does not exist")):
        load_profile(str(missing))


# --- profile files -------------------------------------------------------------------------------------------------


def test_load_by_path_sets_source_and_sha256(tmp_path):
    path = write(tmp_path, bundled_with('name = "android-arm64"', 'name = "my-phone"'))
    p = load_profile(str(path))
    assert p.name == "my-phone"
    assert p.source == str(path)
    assert p.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert p.sha256 != load_profile("android-arm64").sha256
    # everything else as in the bundled profile
    assert dataclasses.replace(p, name="android-arm64", source="", sha256="") == dataclasses.replace(
        load_profile("android-arm64"), source="", sha256=""
    )


def test_minimal_profile_takes_the_documented_defaults(tmp_path):
    p = load_profile(str(write(tmp_path, MINIMAL)))
    assert p.quantization == QuantizationSpec()
    assert p.package == PackageSpec()
    assert p.accuracy == AccuracyBudget()


def test_int_is_accepted_for_float_and_stored_as_float(tmp_path):
    p = load_profile(str(write(tmp_path, MINIMAL + "[quantization]\ncalibration_percentile = 99\n")))
    assert p.quantization.calibration_percentile == 99.0
    assert type(p.quantization.calibration_percentile) is float


def test_typo_key_names_file_and_key_and_suggests_the_field(tmp_path):
    path = write(tmp_path, bundled_with('calibration_method = "percentile"', 'calibraton_method = "percentile"'))
    with pytest.raises(ProfileError) as exc:
        load_profile(str(path))
    assert str(path) in exc.value.message
    assert "unknown key 'quantization.calibraton_method'" in exc.value.message
    assert exc.value.hint == "did you mean 'calibration_method'?"


def test_typo_top_level_key(tmp_path):
    path = write(tmp_path, MINIMAL + 'exectuion_provider = "CPUExecutionProvider"\n')
    with pytest.raises(ProfileError, match=r"unknown key 'exectuion_provider'") as exc:
        load_profile(str(path))
    assert exc.value.hint == "did you mean 'execution_provider'?"


def test_unknown_key_far_from_any_field_lists_valid_keys(tmp_path):
    path = write(tmp_path, MINIMAL + "[package]\ncolour = 'red'\n")
    with pytest.raises(ProfileError, match=r"unknown key 'package.colour'") as exc:
        load_profile(str(path))
    assert exc.value.hint.startswith("valid keys here: ")
    for f in dataclasses.fields(PackageSpec):
        assert f.name in exc.value.hint


@pytest.mark.parametrize(
    "section, typo, intended",
    [("accuracy", "min_min_cosin", "min_min_cosine"), ("quantization", "calibration_seqlen", "calibration_seq_len")],
)
def test_typo_suggestion_is_the_closest_field(tmp_path, section, typo, intended):
    path = write(tmp_path, MINIMAL + f"[{section}]\n{typo} = 1\n")
    with pytest.raises(ProfileError) as exc:
        load_profile(str(path))
    assert exc.value.hint == f"did you mean '{intended}'?"


@pytest.mark.parametrize(
    "line, bad, expected",
    [
        ("calibration_samples = 128", 'calibration_samples = "128"',
         "'quantization.calibration_samples' must be int, got str '128'"),
        ("calibration_samples = 128", "calibration_samples = 128.0",
         "'quantization.calibration_samples' must be int, got float 128.0"),
        ("verify_samples = 4", "verify_samples = true", "'package.verify_samples' must be int, got bool True"),
        ("weight_symmetric = true", "weight_symmetric = 1", "'quantization.weight_symmetric' must be bool, got int 1"),
        ("calibration_percentile = 99.999", 'calibration_percentile = "99.999"',
         "'quantization.calibration_percentile' must be float, got str '99.999'"),
        ("min_mean_cosine = 0.995", "min_mean_cosine = false", "'accuracy.min_mean_cosine' must be float, got bool False"),
        ('name = "android-arm64"', "name = 64", "'name' must be str, got int 64"),
        ('keep_fp16 = ["embedding"]', 'keep_fp16 = "embedding"',
         "'quantization.keep_fp16' must be a list of strings, got 'embedding'"),
        ('model_kinds = ["encoder", "causal-lm"]', "model_kinds = [1]", "'model_kinds' must be a list of strings, got [1]"),
    ],
)
def test_wrong_type(tmp_path, line, bad, expected):
    path = write(tmp_path, bundled_with(line, bad))
    with pytest.raises(ProfileError) as exc:
        load_profile(str(path))
    assert str(path) in exc.value.message
    assert expected in exc.value.message
    key = line.split(" = ")[0]
    doc = next(d for k, _, d in describe_fields() if k.split(".")[-1] == key)
    assert exc.value.hint == doc  # the hint is the field's documentation


def test_list_with_non_string_items_is_refused(tmp_path):
    path = write(tmp_path, bundled_with("keep_fp32_nodes = []", "keep_fp32_nodes = [1, 2]"))
    with pytest.raises(ProfileError, match=r"'quantization.keep_fp32_nodes' must be a list of strings, got \[1, 2\]"):
        load_profile(str(path))


def test_section_that_is_not_a_table(tmp_path):
    path = write(tmp_path, MINIMAL + "quantization = 5\n")
    with pytest.raises(ProfileError, match=r"\[quantization\] must be a table"):
        load_profile(str(path))


@pytest.mark.parametrize(
    "line, bad, loc",
    [
        ('calibration_method = "percentile"', 'calibration_method = "entropy"', "quantization.calibration_method"),
        ('activation_type = "uint8"', 'activation_type = "fp8"', "quantization.activation_type"),
        ('sensitive_precision = "int8-per-token"', 'sensitive_precision = "int4"', "quantization.sensitive_precision"),
        ('target_platform = "arm"', 'target_platform = "riscv"', "package.target_platform"),
        ('execution_provider = "CPUExecutionProvider"', 'execution_provider = "NnapiExecutionProvider"',
         "execution_provider"),
    ],
)
def test_value_not_among_choices(tmp_path, line, bad, loc):
    path = write(tmp_path, bundled_with(line, bad))
    value = bad.split(" = ")[1].strip('"')
    with pytest.raises(ProfileError) as exc:
        load_profile(str(path))
    assert f"'{loc}' = '{value}' is not one of" in exc.value.message
    assert str(path) in exc.value.message
    # the valid choices are listed
    assert line.split(" = ")[1].strip('"') in exc.value.message


@pytest.mark.parametrize("missing", ["name", "description", "target"])
def test_missing_required_key(tmp_path, missing):
    text = bundled_with(next(ln for ln in BUNDLED.read_text().splitlines() if ln.startswith(f"{missing} = ")), "")
    path = write(tmp_path, text)
    with pytest.raises(ProfileError, match=rf"missing required key '{missing}'") as exc:
        load_profile(str(path))
    assert str(path) in exc.value.message
    assert exc.value.hint.startswith(f"add '{missing} = ...': ")


@pytest.mark.parametrize(
    "text",
    [
        MINIMAL + "[quantization\nweight_type = 'int8'\n",  # unclosed table header
        MINIMAL + "name = 'twice'\n",  # duplicate key
        MINIMAL + "[package]\nzip = yes\n",  # bare word value
    ],
)
def test_invalid_toml(tmp_path, text):
    path = write(tmp_path, text)
    with pytest.raises(ProfileError, match=r"is not valid TOML") as exc:
        load_profile(str(path))
    assert str(path) in exc.value.message
    assert exc.value.hint == "fix the syntax at the position given"


def test_non_utf8_profile_is_a_profile_error(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes(MINIMAL.encode() + 'description2 = "caf\xe9"\n'.encode("latin-1"))
    with pytest.raises(ProfileError, match=r"is not valid TOML"):
        load_profile(str(path))


# --- field documentation -------------------------------------------------------------------------------------------


def _leaf_keys(cls, prefix=""):
    hints = typing.get_type_hints(cls)
    keys = []
    for f in dataclasses.fields(cls):
        if f.name in ("source", "sha256"):
            continue
        if dataclasses.is_dataclass(hints[f.name]):
            keys += _leaf_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def test_describe_fields_covers_every_field_with_a_doc():
    rows = describe_fields()
    keys = [k for k, _, _ in rows]
    assert keys == _leaf_keys(Profile)
    assert len(keys) == len(set(keys))
    assert {"quantization.calibration_method", "package.zip", "accuracy.min_retrieval_top1", "name"} <= set(keys)
    for key, _default, doc in rows:
        assert doc.strip(), f"{key} has no doc"


def test_describe_fields_defaults_are_reprs_of_the_dataclass_defaults():
    rows = {k: d for k, d, _ in describe_fields()}
    assert rows["name"] == ""  # required
    assert rows["quantization.calibration_method"] == repr("percentile")
    assert rows["quantization.keep_fp16"] == repr(("embedding", "norm"))
    assert rows["accuracy.eval_samples"] == "320"


def test_every_loader_field_is_documented_too():
    for f in dataclasses.fields(Profile):
        assert f.metadata.get("doc"), f.name


def test_bundled_profile_sets_every_documented_key():
    """The bundled file is the reference: it spells out every key, so defaults can change without moving it (except
    [qnn], which only QNN profiles read; android-qnn-htp.toml spells that section out, see test_profiles_qnn.py)."""
    data = tomllib.loads(BUNDLED.read_text())
    keys = set()
    for key, value in data.items():
        if isinstance(value, dict):
            keys |= {f"{key}.{sub}" for sub in value}
        else:
            keys.add(key)
    assert keys == {k for k in _leaf_keys(Profile) if not k.startswith("qnn.")}


# --- command-line overrides (--set) ----------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("llm.symmetric=true", ("llm.symmetric", True)),
    ("llm.block_size = 64", ("llm.block_size", 64)),
    ("llm.max_size_mb=120.5", ("llm.max_size_mb", 120.5)),
    ("llm.int4_method=rtn", ("llm.int4_method", "rtn")),  # a bare word is a string
    ('model_kinds=["encoder"]', ("model_kinds", ["encoder"])),
])
def test_parse_setting(text, expected):
    assert parse_setting(text) == expected


def test_overrides_are_validated_like_the_file():
    p = load_profile("android-arm64", overrides={"llm.symmetric": True, "llm.max_size_mb": 120})
    assert p.llm.symmetric is True and p.llm.max_size_mb == 120.0
    assert p.sha256 == load_profile("android-arm64").sha256  # the file's hash; the manifest records the overrides
    with pytest.raises(ProfileError, match=r"'llm.promote' = -1 is out of range"):
        load_profile("android-arm64", overrides={"llm.promote": -1})
    with pytest.raises(ProfileError, match=r"'llm' is not a section|no such profile key"):
        load_profile("android-arm64", overrides={"llm.symmetric.x": 1})


def _float_keys(cls=Profile, prefix: str = "") -> list[str]:
    types = typing.get_type_hints(cls)
    keys = []
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(types[f.name]):
            keys += _float_keys(types[f.name], f"{prefix}{f.name}.")
        elif types[f.name] is float:
            keys.append(f"{prefix}{f.name}")
    return keys


@pytest.mark.parametrize("key", _float_keys())
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_every_float_field_refuses_non_finite_values(key, value):
    with pytest.raises(ProfileError, match=re.escape(f"'{key}' = {value!r} is not a finite number")) as err:
        load_profile("android-arm64", overrides={key: value})
    assert err.value.hint


@pytest.mark.parametrize("line, value", [("nan", "nan"), ("+inf", "inf"), ("-nan", "nan"), ("1e400", "inf")])
def test_non_finite_toml_value_is_refused_with_key_and_value(tmp_path, line, value):
    path = write(tmp_path, bundled_with("max_size_ratio = 0.40", f"max_size_ratio = {line}"))
    with pytest.raises(ProfileError, match=rf"'package.max_size_ratio' = {value} is not a finite number"):
        load_profile(str(path))


@pytest.mark.parametrize("text, key", [("llm.promote=nan", "llm.promote"), ("llm.max_size_mb=inf", "llm.max_size_mb"),
                                       ("llm.max_ppl_increase=1e999", "llm.max_ppl_increase")])
def test_non_finite_set_value_parses_and_is_refused(text, key):
    parsed = parse_setting(text)
    assert parsed[0] == key and not math.isfinite(parsed[1])
    with pytest.raises(ProfileError, match=rf"--set {re.escape(key)}: '{re.escape(key)}' = \S+ is not a finite"):
        load_profile("android-arm64", overrides=dict([parsed]))


def test_range_bounds_hold_at_both_ends():
    assert load_profile("android-arm64", overrides={"quantization.calibration_percentile": 90}).quantization \
        .calibration_percentile == 90.0
    assert load_profile("android-arm64", overrides={"quantization.calibration_percentile": 100}).quantization \
        .calibration_percentile == 100.0
    for bad in (89.999, 100.001):
        with pytest.raises(ProfileError, match="out of range"):
            load_profile("android-arm64", overrides={"quantization.calibration_percentile": bad})


@pytest.mark.parametrize("name", sorted(known_profiles()))
def test_every_bundled_profile_loads(name):
    """Every file loads (unknown keys and bad values are errors); android-arm64.toml alone must spell out every key
    (test above), so a new section's defaults reach the other profiles without editing them."""
    p = load_profile(name)
    assert p.name == name
    assert p.note or p.status == "supported"  # a deprecated profile says why


# A precision no pass implements used to load, reach the manifest and leave the layer FP32 (issue 12): refused now.
@pytest.mark.parametrize("value", ["fp16", "w16a16", "int4"])
def test_sensitive_precision_no_pass_implements_is_refused_from_set(value):
    with pytest.raises(ProfileError) as exc:
        load_profile("android-arm64", overrides={"quantization.sensitive_precision": value})
    assert (f"'quantization.sensitive_precision' = '{value}' is not one of int8, int8-weight-only, int8-per-token, w8a16, fp32 "
            "(the precisions a pass implements for 'linear' nodes in the encoder-cpu recipe)") in exc.value.message
    assert exc.value.exit_code == 2


def test_sensitive_precision_no_pass_implements_is_refused_from_a_file(tmp_path):
    path = write(tmp_path, bundled_with('sensitive_precision = "int8-per-token"', 'sensitive_precision = "w16a16"'))
    with pytest.raises(ProfileError, match=r"'quantization.sensitive_precision' = 'w16a16' is not one of int8, "
                                           r"int8-weight-only, int8-per-token, w8a16, fp32 \(the precisions a pass "
                                           r"implements"):
        load_profile(str(path))


@pytest.mark.parametrize("key, value, allowed", [
    ("llm.embedding_precision", "int4", "fp16, int8, fp32"),
    ("llm.lm_head_precision", "fp32", "fp16, int8, int4"),
])
def test_llm_precision_fields_take_what_a_pass_implements(key, value, allowed):
    with pytest.raises(ProfileError, match=f"'{key}' = '{value}' is not one of {allowed} "):
        load_profile("android-arm64", overrides={key: value})


def test_an_int8_embedding_table_needs_the_int8_head_that_shares_it():
    with pytest.raises(ProfileError, match=r"embedding_precision = 'int8' with lm_head_precision = 'fp16'.*"
                                           r"reads the 8-bit table's own codes"):
        load_profile("android-arm64", overrides={"llm.embedding_precision": "int8"})
    profile = load_profile("android-arm64", overrides={"llm.embedding_precision": "int8",
                                                       "llm.lm_head_precision": "int8"})
    assert (profile.llm.embedding_precision, profile.llm.lm_head_precision) == ("int8", "int8")


def test_every_precision_choice_names_an_implementing_pass():
    from edgeq.precision import implemented_by

    for key, _, _ in describe_fields():
        section, _, leaf = key.rpartition(".")
        cls = {"quantization": QuantizationSpec, "llm": LLMSpec}.get(section)
        f = next((f for f in dataclasses.fields(cls) if f.name == leaf), None) if cls else None
        if f is None or not f.metadata.get("precision_of"):
            continue
        assert f.metadata["choices"], key
        for choice in f.metadata["choices"]:
            assert implemented_by(choice, *f.metadata["precision_of"]), (key, choice)
