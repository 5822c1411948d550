"""stop_before: a forward ends at the module, after the hooks registered on it earlier."""

import pytest
import torch

from ivtrainer.modeling.architectures import get_layout
from ivtrainer.modeling.hooks import hooks, record_head_outputs, stop_before
from ivtrainer.testing import tiny_model


def test_the_forward_ends_at_the_module_after_earlier_hooks():
    model = tiny_model("llama")
    layout = get_layout(model)
    ran = []
    later = layout.layers[2].register_forward_hook(lambda *_: ran.append(2))
    with hooks(later), record_head_outputs(model, [1]) as heads, stop_before(layout.attn_outputs[1]):
        model(input_ids=torch.tensor([[1, 2, 3]]))
    assert heads[1].shape == (1, 3, layout.n_heads, layout.head_dim)  # recorded before the stop
    assert ran == []  # layer 2 never ran
    assert not layout.attn_outputs[1]._forward_pre_hooks  # the stop hook removed itself


def test_a_forward_that_never_reaches_the_module_is_an_error():
    model = tiny_model("llama")
    with pytest.raises(RuntimeError, match="never reached"), stop_before(torch.nn.Linear(1, 1)):
        model(input_ids=torch.tensor([[1, 2, 3]]))
