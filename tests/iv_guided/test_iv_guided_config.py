"""IVGuidedConfig: the command line and bad values."""

from __future__ import annotations

import math

import pytest
from transformers import HfArgumentParser

from ivtrainer import IVGuidedConfig
from ivtrainer.iv_guided.schedules import Schedule


def test_config_from_the_command_line():
    (config,) = HfArgumentParser(IVGuidedConfig).parse_args_into_dataclasses(
        [
            "--output_dir",
            "o",
            "--instruction_vectors",
            "a",
            "b",
            "--iv_schedule",
            "exponential",
            "--kl_direction",
            "jsd",
            "--kl_weight",
            "0.5",
            "--kl_weight_end",
            "0",
            "--report_to",
            "none",
        ]
    )
    assert config.instruction_vectors == ["a", "b"] and config.iv_schedule_obj().kind == "exponential"
    assert config.kl_schedule_obj() == Schedule("constant", 0.5, 0.0, 1.0)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"iv_schedule_fraction": 1.5}, "fraction must be in"),
        ({"kl_schedule_fraction": -0.5}, "fraction must be in"),
        ({"kl_weight": -1.0}, "must be >= 0"),
        ({"iv_strength_start": math.inf}, "finite"),
        ({"kl_temperature": 0.0}, "kl_temperature must be > 0"),
        ({"kl_positions": "prompt"}, "kl_positions must be one of"),
        ({"iv_schedule": "warmup"}, "schedule must be one of"),
    ],
)
def test_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        IVGuidedConfig(output_dir="o", **kw)
