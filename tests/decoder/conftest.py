from __future__ import annotations

import pytest

from .tiny import checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """variant -> tiny checkpoint folder, each written once per session on first use."""
    root = tmp_path_factory.mktemp("decoder_tiny")
    made: dict = {}

    def get(variant: str):
        if variant not in made:
            made[variant] = checkpoint(variant, root / variant)
        return made[variant]

    return get
