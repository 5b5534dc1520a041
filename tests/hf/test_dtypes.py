"""Dtypes: half-precision models quantize, save and reload; model casts and ``load_state_dict`` never
change the stored dtypes; weights too small for fp16 scales are refused, not zeroed."""


import pytest
import torch
from conftest import logits_of as _logits
from transformers import AutoModelForCausalLM

import hf_rbe
from hf_rbe import FormatError, RBEConfig


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_load_quantize_save_reload(tiny_llama_dir, saved, tmp_path, dtype):
    d, _ = saved["v2-3"]
    m = AutoModelForCausalLM.from_pretrained(d, dtype=dtype)
    assert m.model.layers[0].self_attn.q_proj.scale.dtype == torch.float16  # stored dtypes kept
    assert m.model.layers[0].self_attn.q_proj.table.dtype == torch.float32
    q = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=dtype, quantization_config=RBEConfig())
    q.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)  # plain reload, dtype from config.json
    assert again.dtype == dtype and torch.equal(_logits(again), _logits(q))


def test_model_casts_keep_the_stored_dtypes(saved, tmp_path):
    d, ref = saved["v2-3"]
    m = AutoModelForCausalLM.from_pretrained(d)
    m.bfloat16()  # transformers allows this one on quantized models (.half() / .float() it refuses)
    layer = m.model.layers[0].self_attn.q_proj
    assert layer.scale.dtype == torch.float16 and layer.table.dtype == torch.float32
    out = _logits(m)
    assert out.dtype == torch.bfloat16 and (out.float() - ref).abs().max() < 0.1
    m.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert again.dtype == torch.bfloat16  # config.json records what the model computes in now
    # not bit-identical: .bfloat16() also casts the rotary inv_freq buffer, a bf16 load keeps it fp32
    assert (_logits(again).float() - out.float()).abs().max() < 0.02


def test_load_state_dict_rebuilds_rotation_signs_and_checks_dtypes(tiny_llama_dir, saved):
    d, ref = saved["v2-3"]
    state = AutoModelForCausalLM.from_pretrained(d).state_dict()
    other = AutoModelForCausalLM.from_pretrained(tiny_llama_dir,
                                                 quantization_config=RBEConfig.from_preset("v2-3", rotation_seed=7))
    assert not torch.equal(_logits(other), ref)
    other.load_state_dict(state)
    assert torch.equal(_logits(other), ref)
    key = next(k for k in state if k.endswith("q_proj.weight"))
    with pytest.raises(FormatError, match="float32"):
        other.load_state_dict({**state, key: state[key].float()})


@pytest.mark.parametrize("preset", ["v2-3", "rbe-3"])
def test_tiny_weights_are_refused_not_zeroed(tiny_llama_dir, preset):
    m = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    with torch.no_grad():
        m.model.layers[0].self_attn.q_proj.weight.mul_(1e-9)
    with pytest.raises(FormatError, match="q_proj.*underflow fp16"):
        hf_rbe.quantize_model(m, RBEConfig.from_preset(preset))


def test_zero_rows_and_small_weights_still_encode(tiny_llama_dir):
    m = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    with torch.no_grad():
        m.model.layers[0].self_attn.q_proj.weight[:4] = 0
        m.model.layers[0].mlp.up_proj.weight.mul_(1e-3)  # weights ~2e-5: subnormal fp16 scales, kept
    hf_rbe.quantize_model(m, RBEConfig.from_preset("v2-3"))
    w = m.model.layers[0].self_attn.q_proj.dequantize()
    assert torch.equal(w[:4], torch.zeros_like(w[:4]))
    assert w[4:].abs().sum() > 0


@pytest.mark.parametrize("storage", ["float16", "bfloat16"])
def test_a_cast_model_computes_in_the_new_dtype_and_keeps_its_stored_embedding_and_head(tiny_llama_dir, storage):
    m = AutoModelForCausalLM.from_pretrained(
        tiny_llama_dir, quantization_config=RBEConfig.from_preset("v2-3", embedding_dtype=storage))
    emb, head = m.get_input_embeddings(), m.get_output_embeddings()
    stored = emb.weight.detach().clone(), head.weight.detach().clone()
    ref = _logits(m)
    seen = []
    m.model.layers[0].self_attn.q_proj.register_forward_pre_hook(lambda mod, args: seen.append(args[0].dtype))
    m.bfloat16()
    out = _logits(m)
    assert seen == [torch.bfloat16]  # the lookups follow the cast, so the whole residual stream does
    assert torch.equal(emb.weight, stored[0]) and torch.equal(head.weight, stored[1])
    assert emb.weight.dtype == head.weight.dtype == getattr(torch, storage)  # what the format stores, kept
    assert out.dtype == torch.bfloat16 and (out.float() - ref).abs().max() < 0.1


def test_prefill_dtype_multiplies_a_prompt_in_bf16_decodes_in_fp32_and_survives_a_reload(tiny_llama_dir, tmp_path):
    """``prefill_dtype="bfloat16"`` on an fp32 model: a 40-token prompt's products are bf16 ones
    (logits near the default model's, not equal), a one-token step is the default model's bit for bit,
    and the setting is saved in config.json and back on every layer after a plain reload."""
    fp32 = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=RBEConfig.from_preset("v2-3"))
    m = AutoModelForCausalLM.from_pretrained(
        tiny_llama_dir, quantization_config=RBEConfig.from_preset("v2-3", prefill_dtype="bfloat16"))
    layers = [mod for mod in m.modules() if isinstance(mod, hf_rbe.RBELinear)]
    assert layers and all(layer.prefill_dtype == torch.bfloat16 for layer in layers)
    prompt = torch.randint(0, m.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))
    step = prompt[:, :1]
    ref, got = _logits(fp32, prompt), _logits(m, prompt)
    assert got.dtype == torch.float32 and not torch.equal(got, ref)
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()
    assert torch.equal(_logits(m, step), _logits(fp32, step))
    m.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert again.config.quantization_config.prefill_dtype == "bfloat16"
    assert all(mod.prefill_dtype == torch.bfloat16 for mod in again.modules() if isinstance(mod, hf_rbe.RBELinear))
    assert torch.equal(_logits(again, prompt), got)
