import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_models import tiny_bert  # noqa: E402


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A tiny random BertModel folder (2 layers, hidden 64), built once per test session."""
    return tiny_bert(tmp_path_factory.mktemp("models") / "tiny-bert")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny random LlamaForCausalLM folder (tests/llm/tiny_llama.py), built once per test session."""
    from llm.tiny_llama import tiny_llama

    return tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")
