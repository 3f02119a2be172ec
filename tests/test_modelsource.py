"""edgeq.modelsource: one model folder per bad input, and the hashes of a good one."""

from __future__ import annotations

import hashlib
import json
import re

import pytest

from edgeq.errors import ModelFolderError, UnsupportedModelError, UserInputError
from edgeq.families import ENCODER, supported_model_types
from edgeq.modelsource import TOKENIZER_FILES, inspect_model_dir, sha256_file

BERT_CONFIG = {"model_type": "bert", "architectures": ["BertModel"], "hidden_size": 64}


EMPTY_SAFETENSORS = len(b"{}").to_bytes(8, "little") + b"{}"


def one_tensor_safetensors(name: str = "w") -> bytes:
    """A well-formed safetensors file holding one float32 scalar: inspect parses the header, never the tensors."""
    header = json.dumps({name: {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    return len(header).to_bytes(8, "little") + header + b"\0\0\0\0"


def make_folder(root, name="model-x", config=BERT_CONFIG, weights=("model.safetensors",), tokenizer=("vocab.txt",)):
    """A folder that passes every check unless one part is overridden."""
    folder = root / name
    folder.mkdir()
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config) if isinstance(config, dict) else config)
    for w in weights:
        (folder / w).write_bytes(one_tensor_safetensors() if w.endswith(".safetensors") else b"weights:" + w.encode())
    for t in tokenizer:
        (folder / t).write_text("[PAD]\n[UNK]\nhello\n")
    return folder


def refused(folder, error, match):
    with pytest.raises(error, match=match) as exc:
        inspect_model_dir(folder)
    assert exc.value.hint
    assert isinstance(exc.value, UserInputError) and exc.value.exit_code == 2
    return exc.value


# --- fixture folders, one per bad input ----------------------------------------------------------------------------


@pytest.fixture
def missing_folder(tmp_path):
    return tmp_path / "does-not-exist"


@pytest.fixture
def file_not_folder(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"weights")
    return path


@pytest.fixture
def no_config(tmp_path):
    return make_folder(tmp_path, config=None)


@pytest.fixture
def config_not_json(tmp_path):
    return make_folder(tmp_path, config="{'model_type': 'bert',}")


@pytest.fixture
def no_weights(tmp_path):
    return make_folder(tmp_path, weights=())


@pytest.fixture
def only_pickle(tmp_path):
    return make_folder(tmp_path, weights=("pytorch_model.bin",))


@pytest.fixture
def causal_lm(tmp_path):
    return make_folder(tmp_path, config={"model_type": "llama", "architectures": ["LlamaForCausalLM"]})


@pytest.fixture
def unknown_type(tmp_path):
    return make_folder(tmp_path, config={"model_type": "wav2vec2", "architectures": ["Wav2Vec2Model"]})


@pytest.fixture
def remote_code(tmp_path):
    return make_folder(tmp_path, config={**BERT_CONFIG, "auto_map": {"AutoModel": "modeling_custom.CustomModel"}})


@pytest.fixture
def task_head(tmp_path):
    return make_folder(tmp_path, config={"model_type": "bert", "architectures": ["BertForSequenceClassification"]})


@pytest.fixture
def no_tokenizer(tmp_path):
    return make_folder(tmp_path, tokenizer=())


def test_missing_folder(missing_folder):
    refused(missing_folder, ModelFolderError, r"model folder .*does-not-exist does not exist")


def test_file_instead_of_folder(file_not_folder):
    err = refused(file_not_folder, ModelFolderError, r"model\.safetensors is not a folder")
    assert "not a file inside it" in err.hint


def test_no_config_json(no_config):
    err = refused(no_config, ModelFolderError, r"has no config\.json")
    assert "config.json" in err.hint


def test_config_json_is_not_json(config_not_json):
    refused(config_not_json, ModelFolderError, r"config\.json is not valid JSON")


def test_config_but_no_weights(no_weights):
    err = refused(no_weights, ModelFolderError, r"holds no safetensors weights")
    assert "model.safetensors" in err.hint
    assert "pickle" not in err.hint  # nothing to explain: there is no .bin either


def test_only_pytorch_model_bin_explains_pickle_refusal(only_pickle):
    err = refused(only_pickle, ModelFolderError,
                  r"holds no safetensors weights, only pickle files \(pytorch_model\.bin\).*unpickling can run code")
    assert "safe_serialization=True" in err.hint and "--allow-pickle" in err.hint


@pytest.mark.parametrize("name", ["weights.pt", "model.pth", "last.ckpt", "tok.pkl", "x.pickle", "sub/training_args.bin"])
def test_any_pickle_file_is_named(tmp_path, name):
    folder = make_folder(tmp_path)
    (folder / name).parent.mkdir(exist_ok=True)
    (folder / name).write_bytes(b"pickle")
    refused(folder, ModelFolderError, rf"holds pickle files \({name}\); edgeq does not load")


def test_allowed_pickle_is_used_only_without_safetensors(tmp_path):
    both = make_folder(tmp_path, weights=("model.safetensors", "pytorch_model.bin"))
    src = inspect_model_dir(both, allow_pickle=True)
    assert (src.weight_files, src.weight_format) == (("model.safetensors",), "safetensors")
    assert "pytorch_model.bin" not in src.file_hashes  # never read, so not recorded as the weights
    only = inspect_model_dir(make_folder(tmp_path, name="only", weights=("pytorch_model.bin",)), allow_pickle=True)
    assert (only.weight_files, only.weight_format) == (("pytorch_model.bin",), "pickle")
    assert "pytorch_model.bin" in only.file_hashes


def test_allowed_pickle_under_another_name_is_refused(tmp_path):
    folder = make_folder(tmp_path, weights=("weights.pt",))
    with pytest.raises(ModelFolderError, match="no safetensors weights under transformers' names") as exc:
        inspect_model_dir(folder, allow_pickle=True)
    assert "found weights.pt" in exc.value.hint


def test_safetensors_outside_transformers_names_are_refused(tmp_path):
    err = refused(make_folder(tmp_path, weights=("decoy.safetensors",)), ModelFolderError,
                  r"no safetensors weights under transformers' names")
    assert "found decoy.safetensors" in err.hint


def test_extra_safetensors_are_neither_read_nor_hashed(tmp_path):
    src = inspect_model_dir(make_folder(tmp_path, weights=("model.safetensors", "model.fp16.safetensors")))
    assert src.weight_files == ("model.safetensors",)
    assert "model.fp16.safetensors" not in src.file_hashes


def test_empty_safetensors_is_refused(tmp_path):
    folder = make_folder(tmp_path)
    (folder / "model.safetensors").write_bytes(EMPTY_SAFETENSORS)
    refused(folder, ModelFolderError, r"model\.safetensors holds no tensors")


def test_index_must_name_its_shards(tmp_path):
    folder = make_folder(tmp_path, weights=("model-00001-of-00002.safetensors",))
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "../model-00002-of-00002.safetensors"}}))
    refused(folder, ModelFolderError, r"names the shard '\.\./model-00002-of-00002\.safetensors'")


def test_causal_lm_is_inspected_as_one(causal_lm):
    src = inspect_model_dir(causal_lm)
    assert (src.kind, src.task, src.pooling) == ("causal-lm", "text-generation-with-past", "")


def test_causal_lm_family_not_exported_yet(tmp_path):
    """A *ForCausalLM of a family edgeq.families does not export is named as a causal LM, with the supported families."""
    folder = make_folder(tmp_path, config={"model_type": "gpt_neox", "architectures": ["GPTNeoXForCausalLM"]})
    err = refused(folder, UnsupportedModelError, r"is a causal LM \(GPTNeoXForCausalLM\) of a family")
    assert "llama" in err.hint


@pytest.mark.parametrize(
    "config",
    [
        {"model_type": "qwen2"},  # known causal type without architectures
        {"model_type": "llama", "architectures": ["LlamaForCausalLM"]},
    ],
)
def test_causal_lm_recognised_by_type_or_architecture(tmp_path, config):
    assert inspect_model_dir(make_folder(tmp_path, config=config)).kind == "causal-lm"


def test_base_model_of_a_causal_lm_family_is_refused(tmp_path):
    folder = make_folder(tmp_path, config={"model_type": "llama", "architectures": ["LlamaModel"]})
    err = refused(folder, UnsupportedModelError, r"is a LlamaModel; edgeq exports llama models with their language")
    assert "LlamaForCausalLM" in err.hint


def test_refused_family_is_refused_with_its_reason_before_the_weights_are_read(tmp_path):
    """gemma2 (a Gemma-2 checkpoint) is refused by its registry entry; the folder's weights are a decoy that any
    later check would refuse, so the family check came first."""
    folder = make_folder(tmp_path, config={"model_type": "gemma2", "architectures": ["Gemma2ForCausalLM"]},
                         weights=("pytorch_model.bin",))
    err = refused(folder, UnsupportedModelError, r"\(model_type gemma2\) is a gemma2 causal LM, which edgeq refuses: .*"
                                                 r"no Gemma-2 yet")
    assert "edgeq families" in err.hint


def test_encoder_family_as_causal_lm_is_refused(tmp_path):
    folder = make_folder(tmp_path, config={"model_type": "roberta", "architectures": ["RobertaForCausalLM"]})
    refused(folder, UnsupportedModelError, r"is a causal LM \(RobertaForCausalLM\)")


def test_unknown_model_type(unknown_type):
    err = refused(unknown_type, UnsupportedModelError, r"architecture 'wav2vec2' \(Wav2Vec2Model\) is not supported")
    for t in supported_model_types(ENCODER):
        assert t in err.hint


def test_config_without_model_type(tmp_path):
    refused(make_folder(tmp_path, config={"hidden_size": 8}), UnsupportedModelError,
            re.escape("architecture '(no model_type)' (no architectures) is not supported"))


def test_auto_map_is_refused_never_trust_remote_code(remote_code):
    err = refused(remote_code, UnsupportedModelError, r"needs custom code \(config\.json has 'auto_map'\)")
    assert "trust_remote_code" in err.message
    assert "ships with transformers" in err.hint


def test_task_head_is_unsupported(task_head):
    err = refused(task_head, UnsupportedModelError, r"is a BertForSequenceClassification \(a task head\)")
    assert "BertModel" in err.hint


def test_no_tokenizer_files(no_tokenizer):
    err = refused(no_tokenizer, ModelFolderError, r"has no tokenizer files")
    assert "tokenizer.json" in err.hint


@pytest.mark.parametrize("content", ["[]", '"bert"', "null"])
def test_config_json_that_is_not_an_object(tmp_path, content):
    refused(make_folder(tmp_path, config=content), ModelFolderError, r"config\.json")


# --- good folders --------------------------------------------------------------------------------------------------


def test_minimal_folder_inspects(tmp_path):
    shards = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
    folder = make_folder(tmp_path, weights=shards, tokenizer=("tokenizer.json", "vocab.txt"))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": shards[0], "b": shards[1]}}))
    src = inspect_model_dir(folder)
    assert src.weight_files == ("model.safetensors.index.json", *shards)
    assert set(src.file_hashes) >= set(src.weight_files)
    assert src.tokenizer_files == ("tokenizer.json", "vocab.txt")  # in TOKENIZER_FILES order
    assert src.name == "model-x"
    assert src.pooling == "mean"


def test_folder_named_model_takes_its_parents_name(tmp_path):
    (tmp_path / "my-encoder").mkdir()
    folder = make_folder(tmp_path / "my-encoder", name="model")
    assert inspect_model_dir(folder).name == "my-encoder"


@pytest.mark.parametrize("cls_token, pooling", [(True, "cls"), (False, "mean")])
def test_sentence_transformers_pooling_config(tmp_path, cls_token, pooling):
    folder = make_folder(tmp_path)
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(
        json.dumps({"pooling_mode_cls_token": cls_token, "pooling_mode_mean_tokens": not cls_token}))
    assert inspect_model_dir(folder).pooling == pooling


def test_tiny_bert_inspects_as_encoder(tiny_bert_dir):
    src = inspect_model_dir(tiny_bert_dir)
    assert src.kind == "encoder"
    assert src.task == "feature-extraction"
    assert src.model_type == "bert"
    assert src.architecture == "BertModel"
    assert src.path == tiny_bert_dir.resolve()
    assert src.name == "tiny-bert"
    assert src.weight_files == ("model.safetensors",)
    assert src.pooling == "mean"
    assert "vocab.txt" in src.tokenizer_files and "tokenizer.json" in src.tokenizer_files
    assert set(src.tokenizer_files) <= set(TOKENIZER_FILES)


def test_tiny_bert_hashes_equal_hashlib(tiny_bert_dir):
    src = inspect_model_dir(tiny_bert_dir)
    expected_files = {"config.json", *src.weight_files, *src.tokenizer_files}
    assert set(src.file_hashes) == expected_files
    for name, digest in src.file_hashes.items():
        assert digest == hashlib.sha256((tiny_bert_dir / name).read_bytes()).hexdigest(), name


def test_sha256_file_reads_in_chunks(tmp_path):
    path = tmp_path / "blob"
    data = bytes(range(256)) * 1000 + b"tail"
    path.write_bytes(data)
    assert sha256_file(path, chunk=1000) == hashlib.sha256(data).hexdigest()
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("content, match", [
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 10\n", r"git-lfs pointer"),
    (b"\xff" * 16, r"not a valid safetensors file"),
    ((100).to_bytes(8, "little") + b"{}", r"not a valid safetensors file"),
    (b"", r"not a valid safetensors file"),
])
def test_broken_safetensors_is_refused(tmp_path, content, match):
    folder = make_folder(tmp_path)
    (folder / "model.safetensors").write_bytes(content)
    refused(folder, ModelFolderError, match)
