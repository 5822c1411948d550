"""IVInterventionCallback and the training-time intervention."""

from __future__ import annotations

from ivtrainer.testing import tiny_model
from tests.utils import collator


def test_last_prompt_fallback_in_training_is_reported(tmp_path, iv, data, caplog):
    """A training forward without labels cannot find the last prompt token: said once, not silent."""
    from transformers.utils import logging as hf_logging

    model = tiny_model("llama")
    batch = collator()([data[i] for i in range(2)])
    hf_logging.enable_propagation()
    try:
        with iv.apply(model, positions="last_prompt"), caplog.at_level("WARNING"):
            model.train()
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        hf_logging.disable_propagation()
    warnings = [r for r in caplog.records if "need the batch's labels" in r.getMessage()]
    assert len(warnings) == 1
