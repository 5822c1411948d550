"""ContinualSettings: the recipe each guided method trains with."""

from __future__ import annotations

import pytest

from ivtrainer.continual.continual_config import ContinualSettings
from ivtrainer.iv_guided.recipes import RECIPES


def test_each_guided_method_trains_with_its_recipe_scaled():
    iv = ContinualSettings(tasks=("plural",), method="iv-guided", kl_scale=0.5, teacher_strength=2.0)
    assert iv.guided_values() == {
        **RECIPES["fvforgetting"],
        "kl_weight": [10.0, 0.05],
        "teacher_iv_strength": 2.0,
    }
    anchor = ContinualSettings(tasks=("plural",), method="kl-anchor")
    assert anchor.guided_values() == RECIPES["kl-anchor"]
    named = ContinualSettings(tasks=("plural",), method="iv-guided", recipe="kl-all")
    assert (
        named.guided_values()["kl_positions"] == ["all"] and named.guided_values()["iv_strength_start"] == 1.0
    )


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"method": "iv-guided", "recipe": "kl_all"}, "unknown recipe 'kl_all'"),
        ({"method": "replay", "recipe": "kl-anchor"}, "method 'replay' has none"),
        ({"method": "kl-anchor", "recipe": "fvforgetting"}, "which kl-anchor does not have"),
    ],
)
def test_a_recipe_that_cannot_apply_is_refused(settings, match):
    with pytest.raises(ValueError, match=match):
        ContinualSettings(tasks=("plural",), **settings)
