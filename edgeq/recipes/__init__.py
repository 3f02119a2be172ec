"""Recipes: one per (model kind, target kind), each building a package from the shared stages.

``recipe_for`` is the one place the export path forks. Each recipe is imported only when chosen: the causal-LM
recipe pulls in torch and transformers, the QNN one the optional QNN EP plugin."""

from __future__ import annotations

from edgeq.profiles import QNN_EP, Profile
from edgeq.recipes.base import Built, Recipe

__all__ = ["Built", "Recipe", "recipe_for"]


def recipe_for(source_kind: str, profile: Profile) -> Recipe:
    """The recipe for a model of ``source_kind`` (ModelSource.kind) exported with ``profile``."""
    if source_kind == "causal-lm":
        from edgeq.recipes.causal_lm import CausalLM

        return CausalLM()
    if profile.execution_provider == QNN_EP:
        from edgeq.recipes.encoder_qnn import EncoderQnn

        return EncoderQnn()
    from edgeq.recipes.encoder_cpu import EncoderCpu

    return EncoderCpu()
