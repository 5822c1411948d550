"""FLearningConfig: the command line and bad values."""

from __future__ import annotations

import pytest
from transformers import HfArgumentParser, TrainingArguments

from ivtrainer import FLearningConfig


def test_config_parses_from_the_command_line():
    (config,) = HfArgumentParser(FLearningConfig).parse_args_into_dataclasses(
        [
            "--output_dir",
            "o",
            "--forget_method",
            "lora",
            "--learn_method",
            "full",
            "--forget_lambda",
            "0.3",
            "--lora_target_modules",
            "q_proj",
            "v_proj",
            "--report_to",
            "none",
        ]
    )
    assert (config.variant, config.forget_lambda, config.lora_target_modules) == (
        "LoRA->FT",
        0.3,
        ["q_proj", "v_proj"],
    )
    assert (config.old_num_train_epochs, config.old_learning_rate) == (3.0, 1e-3)  # a LoRA old phase's
    assert FLearningConfig(output_dir="o").old_learning_rate == 5e-5  # the paper's, for full fine-tuning
    old = config.old_phase_arguments()
    assert type(old) is TrainingArguments and old.output_dir == "o/_forget" and old.num_train_epochs == 3.0
    assert config.lora_config().target_modules == {"q_proj", "v_proj"}


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"forget_lambda": float("nan")}, "finite number >= 0"),
        ({"forget_lambda": -1.0}, "finite number >= 0"),
        ({"forget_method": "qlora"}, "forget_method must be 'full' or 'lora'"),
        ({"learn_method": "adapter"}, "learn_method must be"),
        ({"old_num_train_epochs": 0}, "old_num_train_epochs must be > 0"),
        ({"lora_r": 0}, "lora_r must be >= 1"),
    ],
)
def test_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        FLearningConfig(output_dir="o", **kw)
