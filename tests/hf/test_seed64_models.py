"""seed64 through transformers: quantize on load, save, reload in a fresh process; config checks."""


import pytest
import torch
from conftest import assert_fresh_reload_identical, rel_mse
from transformers import AutoModelForCausalLM

from hf_rbe import RBEConfig, Seed64Linear


@pytest.mark.parametrize("residual", ["none", "rbe"])
def test_seed64_in_a_transformers_model(tiny_llama_dir, tmp_path, residual):
    kw = {"residual_stage": {"dim": 4, "idx": 7, "amp": 2}} if residual == "rbe" else {}
    cfg = RBEConfig(codec="seed64", tile=32, residual=residual, **kw)
    ref = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    m = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=cfg)
    layer = m.model.layers[0].mlp.up_proj
    assert isinstance(layer, Seed64Linear) and (layer.residual is not None) == (residual == "rbe")
    w = ref.model.layers[0].mlp.up_proj.weight
    rel = rel_mse(layer.dequantize(), w)
    assert rel <= 1.0 + 1e-6 and (residual == "none" or rel < 0.1), rel
    expected_bpw = (64 + 16) / 32**2 + (layer.residual.bits_per_weight if layer.residual is not None else 0)
    assert layer.bits_per_weight == pytest.approx(expected_bpw)
    ids = torch.tensor([[1, 5, 9, 33]])
    with torch.no_grad():
        logits = m(ids).logits
    assert torch.isfinite(logits).all()
    m.save_pretrained(tmp_path)
    assert_fresh_reload_identical(tmp_path, ids, logits)


def test_prepare_qat_refuses_a_seed64_model(tiny_llama_dir):
    from hf_rbe.training import prepare_qat

    m = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=RBEConfig(codec="seed64", residual="rbe"))
    with pytest.raises(ValueError, match="seed64 layer: QAT trains RBE codes only"):
        prepare_qat(m)
