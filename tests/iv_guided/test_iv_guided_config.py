"""IVGuidedConfig: the command line and bad values."""

from __future__ import annotations

import math

import pytest
from transformers import HfArgumentParser

from ivtrainer import IVGuidedConfig
from ivtrainer.iv_guided.kl_loss import KLTerm
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
    # one weight for the default's two terms (last_prompt, all), the thresholds kept
    assert config.kl_terms() == [
        KLTerm("last_prompt", Schedule("constant", 0.5, 0.0, 1.0), 0.1),
        KLTerm("all", Schedule("constant", 0.5, 0.0, 1.0), 0.1),
    ]


def test_the_default_is_fvforgettings_recipe_and_terms_come_from_the_command_line():
    default = IVGuidedConfig(output_dir="o", report_to="none")
    assert default.kl_terms() == [KLTerm("last_prompt", 20.0, 0.1), KLTerm("all", 0.1, 0.1)]
    assert (default.iv_strength_start, default.teacher_iv_strength, default.kl_temperature) == (0.0, 1.0, 2.0)
    assert (default.head_mse_weight, default.head_mse_threshold, default.head_mse_reference) == (
        1.0,
        0.01,
        "without_iv",
    )
    assert IVGuidedConfig.recipe("fvforgetting", output_dir="o", report_to="none") == default
    paper = IVGuidedConfig.recipe("iv-paper", output_dir="o", report_to="none")
    assert (
        paper.iv_schedule_obj() == Schedule("linear", 1.0, 0.0, 0.5)
        and paper.kl_terms() == default.kl_terms()
    )
    anchor = IVGuidedConfig.recipe("kl-anchor", output_dir="o", report_to="none", learning_rate=1e-3)
    assert not anchor.uses_instruction_vectors() and anchor.learning_rate == 1e-3
    assert anchor.kl_terms() == default.kl_terms() and default.uses_instruction_vectors()
    earlier = IVGuidedConfig.recipe("kl-all", output_dir="o", report_to="none")
    assert earlier.kl_terms() == [KLTerm("all", 1.0, 0.0)] and earlier.head_mse_weight == 0.0
    assert earlier.iv_schedule_obj() == Schedule("linear", 1.0, 0.0, 0.5)
    (parsed,) = HfArgumentParser(IVGuidedConfig).parse_args_into_dataclasses(
        [
            "--output_dir",
            "o",
            "--kl_positions",
            "answer",
            "all",
            "--kl_weight",
            "3",
            "0.5",
            "--kl_threshold",
            "0",
        ]
    )
    assert parsed.kl_terms() == [KLTerm("answer", 3.0, 0.0), KLTerm("all", 0.5, 0.0)]


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"iv_schedule_fraction": 1.5}, "fraction must be in"),
        ({"kl_schedule_fraction": -0.5}, "fraction must be in"),
        ({"kl_weight": -1.0}, "must be >= 0"),
        ({"iv_strength_start": math.inf}, "finite"),
        ({"kl_temperature": 0.0}, "kl_temperature must be > 0"),
        ({"kl_positions": "prompt"}, "KL positions must be one of"),
        ({"kl_positions": ["all", "all"]}, "different positions"),
        ({"kl_positions": ["all"]}, r"kl_weight has 2 values for 1 KL terms \(\['all'\]\)"),
        ({"kl_threshold": [0.1, 0.2, 0.3]}, "kl_threshold has 3 values for 2 KL terms"),
        ({"head_mse_reference": "teacher"}, "head_mse_reference must be"),
        ({"head_mse_threshold": -1.0}, "must be >= 0"),
        ({"iv_schedule": "warmup"}, "schedule must be one of"),
    ],
)
def test_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        IVGuidedConfig(output_dir="o", **kw)


def test_an_unknown_recipe_names_the_known_ones():
    with pytest.raises(
        ValueError, match=r"unknown recipe 'fv'.*\['fvforgetting', 'iv-paper', 'kl-all', 'kl-anchor'\]"
    ):
        IVGuidedConfig.recipe("fv", output_dir="o")
