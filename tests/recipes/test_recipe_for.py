"""The one fork of the export path: model kind x the profile's target -> recipe (edgeq/recipes/__init__.py)."""

import pytest

from edgeq.profiles import load_profile
from edgeq.recipes import recipe_for
from edgeq.resources import PROFILES_DIR

PROFILES = sorted(p.stem for p in PROFILES_DIR.glob("*.toml"))


@pytest.mark.parametrize(("kind", "profile", "recipe"), [
    ("encoder", "android-arm64", "encoder-cpu"),
    ("encoder", "android-qnn-htp", "encoder-qnn"),
    ("causal-lm", "android-arm64", "causal-lm"),
])
def test_recipe_for_picks_by_model_kind_and_target(kind, profile, recipe):
    assert recipe_for(kind, load_profile(profile)).name == recipe


# What each bundled profile takes, and the recipe that builds it (a new profile file adds its row here).
BUNDLED = {
    "android-arm64": {"encoder": "encoder-cpu", "causal-lm": "causal-lm"},
    "android-nnapi": {"encoder": "encoder-cpu"},
    "android-qnn-htp": {"encoder": "encoder-qnn"},
    "ios-arm64": {"encoder": "encoder-cpu"},
    "linux-arm64": {"encoder": "encoder-cpu"},
}


def test_every_bundled_profile_has_a_recipe_for_each_kind_it_takes():
    assert sorted(BUNDLED) == PROFILES
    for name, recipes in BUNDLED.items():
        profile = load_profile(name)
        assert {kind: recipe_for(kind, profile).name for kind in profile.model_kinds} == recipes, name
