"""``quantize_model``: all layers or none (a failure hands the model back as it was), and overrides that
match no layer are reported."""

import logging

import pytest
import torch
from transformers import AutoModelForCausalLM

import hf_rbe
from hf_rbe import FormatError, RBEConfig


@pytest.mark.parametrize("calibrated", [False, True])
def test_failed_quantize_model_leaves_the_model_as_it_was(tiny_llama_dir, calibrated):
    from conftest import char_tokenizer

    m = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    with torch.no_grad():
        m.model.layers[1].mlp.down_proj.weight[3, 5] = float("nan")  # the last block: everything before converts
    before = {k: v.clone() for k, v in m.state_dict().items()}
    kinds = {n: type(x) for n, x in m.named_modules()}
    kw = dict(dataset=["The quick brown fox jumps over the lazy dog. " * 8] * 4, calibration_samples=4,
              calibration_seqlen=32, calibration_finetune_steps=2) if calibrated else {}
    with pytest.raises(FormatError, match="down_proj.*NaN"):
        hf_rbe.quantize_model(m, RBEConfig.from_preset("v2-3", **kw), tokenizer=char_tokenizer())
    assert {n: type(x) for n, x in m.named_modules()} == kinds
    after = m.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items() if not v.isnan().any())
    assert not any(x._forward_hooks or x._forward_pre_hooks for x in m.modules())


def test_overrides_that_match_nothing_warn(tiny_llama_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="hf_rbe"):
        AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=RBEConfig(
            overrides={"*.dense_4h_to_h": {"group_size": 64}}))
    assert "'*.dense_4h_to_h' matches none" in caplog.text


@pytest.mark.parametrize("how", ["quantize_model", "from_pretrained"])
def test_quantizing_a_quantized_model_again_is_refused_and_changes_nothing(tiny_llama_dir, tmp_path, how):
    if how == "quantize_model":
        m = hf_rbe.quantize_model(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), RBEConfig.from_preset("v2-3"))
    else:
        m = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=RBEConfig.from_preset("v2-3"))
    ids = torch.tensor([[1, 5, 9, 33]])
    with torch.no_grad():
        ref = m(ids).logits
    with pytest.raises(hf_rbe.ConfigError, match="already quantized"):
        hf_rbe.quantize_model(m, RBEConfig.from_preset("v2-4"))
    assert m.config.quantization_config.planes == RBEConfig.from_preset("v2-3").planes
    m.save_pretrained(tmp_path)  # still saves and reloads as the v2-3 model it is
    with torch.no_grad():
        assert torch.equal(AutoModelForCausalLM.from_pretrained(tmp_path)(ids).logits, ref)
    m.dequantize()  # the way to quantize it again
    hf_rbe.quantize_model(m, RBEConfig.from_preset("v2-4"))


def test_models_built_from_one_config_object_quantize_one_after_the_other():
    # quantize_model sets quantization_config on the model's config, which LlamaForCausalLM(cfg) shares
    from conftest import tiny_llama_config
    from transformers import LlamaForCausalLM

    cfg = tiny_llama_config()
    for preset in ("v2-3", "v2-4"):
        m = hf_rbe.quantize_model(LlamaForCausalLM(cfg), RBEConfig.from_preset(preset))
        assert m.config.quantization_config.planes == RBEConfig.from_preset(preset).planes


def test_a_model_quantized_by_another_method_is_refused():
    from conftest import tiny_llama_config
    from transformers import LlamaForCausalLM

    m = LlamaForCausalLM(tiny_llama_config())
    m.config.quantization_config = {"quant_method": "gptq", "bits": 4}
    with pytest.raises(hf_rbe.ConfigError, match="already quantized.*gptq"):
        hf_rbe.quantize_model(m, RBEConfig.from_preset("v2-3"))


def test_quantizing_one_model_leaves_a_sibling_built_from_the_same_config_float(tmp_path):
    from conftest import tiny_llama_config
    from transformers import LlamaForCausalLM

    cfg = tiny_llama_config()
    torch.manual_seed(0)
    sibling = LlamaForCausalLM(cfg)
    q = hf_rbe.quantize_model(LlamaForCausalLM(cfg), RBEConfig.from_preset("v2-3"))
    assert getattr(cfg, "quantization_config", None) is None and sibling.config is cfg
    assert all(m.config is q.config for m in q.modules() if "config" in m.__dict__)  # one config inside the model
    sibling.save_pretrained(tmp_path)  # a float checkpoint, as it was
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert not any(isinstance(m, hf_rbe.RBELinear) for m in again.modules())
    assert torch.equal(again.model.layers[0].mlp.down_proj.weight, sibling.model.layers[0].mlp.down_proj.weight)
