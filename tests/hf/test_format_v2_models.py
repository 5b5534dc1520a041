"""Format v2 through transformers: quantize on load, save, a plain reload in a fresh process, Conv1D."""

import json

import pytest
import torch
from conftest import assert_fresh_reload_identical, rel_mse
from transformers import AutoModelForCausalLM

from hf_rbe import RBEConfig, RBELinear

IDS = torch.tensor([[1, 5, 9, 33, 70, 2, 100, 3]])


@pytest.mark.parametrize("preset,logit_err", [("v2-2.5", 0.2), ("v2-4", 0.03)])
def test_quantize_save_reload_bit_identical(tiny_llama_dir, tmp_path, preset, logit_err):
    ref = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    m = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=RBEConfig.from_preset(preset))
    layer = m.model.layers[0].mlp.up_proj
    assert isinstance(layer, RBELinear) and layer.codec.version == 2 and layer.weight.dtype == torch.int16
    assert rel_mse(layer.dequantize(), ref.model.layers[0].mlp.up_proj.weight) < 0.06
    with torch.no_grad():
        logits = m(IDS).logits
    assert rel_mse(logits, ref(IDS).logits) < logit_err  # errors compound over the layers of a random model
    m.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert saved["format_version"] == 2 and saved["planes"] == RBEConfig.from_preset(preset).planes
    assert_fresh_reload_identical(tmp_path, IDS, logits)


def test_gpt2_conv1d_in_v2(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=1, n_head=4, vocab_size=100, n_positions=32)).save_pretrained(tmp_path)
    ref = GPT2LMHeadModel.from_pretrained(tmp_path)
    m = GPT2LMHeadModel.from_pretrained(tmp_path, quantization_config=RBEConfig.from_preset("v2-3"))
    attn = m.transformer.h[0].attn.c_attn
    assert isinstance(attn, RBELinear) and (attn.in_features, attn.out_features) == (64, 192)
    assert rel_mse(attn.dequantize(), ref.transformer.h[0].attn.c_attn.weight.T) < 0.05


def test_embeddings_stored_in_half_precision_save_smaller_and_reload_identically(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_rbe.core.stored import StoredEmbedding, StoredLinear

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "src")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "src", quantization_config=RBEConfig.from_preset("v2-3"))
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "src",
                                             quantization_config=RBEConfig.from_preset("v2-3", embedding_dtype="float16"))
    emb, head = m.model.embed_tokens, m.lm_head
    assert isinstance(emb, StoredEmbedding) and isinstance(head, StoredLinear) and head.weight is emb.weight
    assert emb.weight.dtype == torch.float16
    ids = torch.tensor([[1, 2, 3, 999]])
    with torch.no_grad():
        logits = m(ids).logits
        assert logits.dtype == torch.float32 and rel_mse(logits, plain(ids).logits) < 1e-5
    plain.save_pretrained(tmp_path / "fp32")
    m.save_pretrained(tmp_path / "fp16")
    size = lambda d: (tmp_path / d / "model.safetensors").stat().st_size  # noqa: E731
    assert size("fp16") < size("fp32") - 1000 * 64 * 2  # the embedding's fp32 half is gone
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "fp16")
    assert isinstance(again.model.embed_tokens, StoredEmbedding)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, logits)
