import importlib.util
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_models import tiny_bert  # noqa: E402

NO_OPTIMUM = ("needs optimum-onnx (edgeq's 'encoders' extra, transformers < 4.58), which is not installed: an "
              "encoder export, or the optimum decoder export that tests/llm/test_genai.py packages")


def optimum_installed() -> bool:
    """optimum-onnx's exporter can be found (found, not imported: collection stays fast; a broken one fails)."""
    try:
        return importlib.util.find_spec("optimum.exporters.onnx") is not None
    except ModuleNotFoundError:  # no optimum package at all
        return False


def pytest_collection_modifyitems(config, items):
    """Tests marked ``encoders`` run optimum-onnx's exporter: skipped, saying why, where the extra is absent (an
    environment with transformers 5, which optimum-onnx 0.1.0 does not support)."""
    marked = [item for item in items if item.get_closest_marker("encoders")]
    if marked and not optimum_installed():
        for item in marked:
            item.add_marker(pytest.mark.skip(reason=NO_OPTIMUM))


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A tiny random BertModel folder (2 layers, hidden 64), built once per test session."""
    return tiny_bert(tmp_path_factory.mktemp("models") / "tiny-bert")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny random LlamaForCausalLM folder (tests/llm/tiny_llama.py), built once per test session."""
    from llm.tiny_llama import tiny_llama

    return tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")
