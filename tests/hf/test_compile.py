"""torch.compile(fullgraph=True) of an RBE model: no graph breaks, same logits."""

import pytest
import torch

from hf_rbe import RBEConfig, RBELinear, quantize_model


@pytest.mark.parametrize("preset", ["rbe-2.5", "v2-3"])
def test_compile_fullgraph_matches_eager(preset):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2)
    model = quantize_model(LlamaForCausalLM(cfg).eval(), RBEConfig.from_preset(preset))
    assert isinstance(model.model.layers[0].mlp.up_proj, RBELinear) and not isinstance(model.lm_head, RBELinear)
    ids = torch.tensor([[1, 5, 9, 33, 70]])
    with torch.no_grad():
        eager = model(ids).logits
        compiled = torch.compile(model, fullgraph=True)(ids).logits  # raises on any graph break
    assert torch.allclose(compiled, eager, atol=1e-5, rtol=1e-4)
