"""The matrix file: what a valid one parses into, and one refusal per kind of mistake (error + hint, exit 2)."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from edgeq.cli import main
from edgeq.errors import MatrixFileError
from edgeq.matrix.spec import load_matrix

GOOD = """
profiles = ["android-arm64", "phones/my-phone.toml"]
set = ["quantization.calibration_samples=16", "llm.symmetric=true"]
device_check = true
calibration = "text/calibration.jsonl"

[[model]]
path = "models/minilm"
name = "minilm"
set = ["accuracy.min_mean_cosine=0.99"]
memory_mb = 2500

[[model]]
path = "models/smollm2/smollm2.Q4_1.gguf"

[[cell]]
model = "minilm"
profile = "phones/my-phone.toml"
set = ["quantization.sensitive_precision=w8a16"]
device_check = false
"""


def write(tmp_path, text: str):
    path = tmp_path / "matrix.toml"
    path.write_text(text)
    return path


def test_a_valid_file_parses_into_typed_records(tmp_path):
    spec = load_matrix(write(tmp_path, GOOD))
    assert spec.profiles == ("android-arm64", str(tmp_path / "phones" / "my-phone.toml"))
    assert spec.settings == (("quantization.calibration_samples", 16), ("llm.symmetric", True))  # TOML values
    assert spec.device_check is True and spec.calibration == tmp_path / "text" / "calibration.jsonl"
    minilm, smollm = spec.models
    assert (minilm.model_dir, minilm.gguf_file, minilm.name, minilm.memory_mb) == \
        (tmp_path / "models" / "minilm", None, "minilm", 2500)
    assert minilm.settings == (("accuracy.min_mean_cosine", 0.99),)
    # a .gguf path is the file in its folder, as --gguf-file takes it
    assert (smollm.model_dir, smollm.gguf_file, smollm.name) == (tmp_path / "models" / "smollm2", "smollm2.Q4_1.gguf",
                                                                 None)
    (cell,) = spec.overrides
    assert (cell.model, cell.profile, cell.device_check) == ("minilm", spec.profiles[1], False)


@pytest.mark.parametrize("text, says, hint", [
    ('profile = ["android-arm64"]\n[[model]]\npath = "m"\n', "unknown key 'profile' in the top level",
     "did you mean 'profiles'"),
    ('[[model]]\npath = "m"\nprofiles = ["android-arm64"]\n', "'profiles' is inside [[model]] 1",
     "before the first [[model]]"),
    ('profiles = "android-arm64"\n[[model]]\npath = "m"\n', "'profiles' in the top level must be list, got str", ""),
    ('profiles = ["android-arm64"]\n[[model]]\npath = "m"\nmemory_mb = true\n',
     "'memory_mb' in [[model]] 1 must be int, got bool", ""),
    ('profiles = ["android-arm64"]\n', "no [[model]] tables", "[[model]]"),
    ('[[model]]\npath = "m"\n', "no profiles", "profiles = "),
    ('profiles = ["android-arm64", "android-arm64"]\n[[model]]\npath = "m"\n', "listed twice", ""),
    ('profiles = ["android-arm64"]\n[[model]]\nname = "m"\n', "[[model]] 1 has no 'path'", "path = "),
    ('profiles = ["android-arm64"]\n[[model]]\npath = "m"\nset = ["llm.symmetric"]\n',
     "'set' in [[model]] 1: --set 'llm.symmetric' is not KEY=VALUE", "e.g. --set"),
    ('profiles = ["android-arm64"]\n[[model]]\npath = "m"\nset = [1]\n', "it takes strings KEY=VALUE", ""),
    ('profiles = ["android-arm64"]\n[[model]]\npath = "m/x.gguf"\ngguf_file = "y.gguf"\n',
     "'path' is a GGUF file and 'gguf_file' names another", "gguf_file = the file's name"),
    ('profiles = ["android-arm64"]\n[[model]]\npath = "m"\n[[cell]]\nset = ["a=1"]\n',
     "[[cell]] 1 names neither a model nor a profile", "model = ..."),
    ('profiles = ["android-arm64"\n', "not valid TOML", "fix the syntax"),
])
def test_each_mistake_is_named_with_a_hint(tmp_path, text, says, hint):
    with pytest.raises(MatrixFileError, match="matrix file") as info:
        load_matrix(write(tmp_path, text))
    assert says in info.value.message and hint in info.value.hint and info.value.exit_code == 2


def test_the_command_prints_error_and_hint_and_exits_2(tmp_path):
    path = write(tmp_path, 'profile = ["android-arm64"]\n[[model]]\npath = "m"\n')
    result = CliRunner().invoke(main, ["matrix", str(path), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "error: matrix file" in result.output and "hint: did you mean 'profiles'?" in result.output
    assert not (tmp_path / "out").exists()  # nothing written before the file is valid


def test_a_missing_file_and_jobs_with_ray_are_refused(tmp_path):
    missing = CliRunner().invoke(main, ["matrix", str(tmp_path / "none.toml")])
    assert missing.exit_code == 2 and "does not exist" in missing.output
    both = CliRunner().invoke(main, ["matrix", str(tmp_path / "none.toml"), "--jobs", "2", "--ray", "auto"])
    assert both.exit_code == 2 and "--jobs sizes the local pool" in both.output
