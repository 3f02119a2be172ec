from pathlib import Path

import pytest

from .tiny_llama import tiny_llama


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny random LlamaForCausalLM folder (tests/llm/tiny_llama.py), built once per test session."""
    return tiny_llama(tmp_path_factory.mktemp("models") / "tiny-llama")
