"""Calibrated quantization through transformers: on load and in memory, save/reload, what the config
records, and bad calibration input refused with a clear message."""

import json
from types import SimpleNamespace

import pytest
import torch
from conftest import assert_fresh_reload_identical, rel_mse, tiny_llama_config
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from hf_rbe import RBEConfig, RBELinear, quantize_model
from hf_rbe.hf.calibrate import calibration_ids, find_blocks

TEXT = ["the quick brown fox jumps over the lazy dog and keeps running through the fields " * 6,
        "a calibration text is any text the model would read in use; repetition keeps this one small " * 6]


class CharTokenizer:
    """Characters to ids below ``vocab``: enough to drive a tiny random model."""

    def __init__(self, vocab: int = 128) -> None:
        self.vocab = vocab

    def __call__(self, text: str, return_tensors: str = "pt") -> SimpleNamespace:
        return SimpleNamespace(input_ids=torch.tensor([[ord(c) % self.vocab for c in text]]))


def _cfg(**kw) -> RBEConfig:
    settings = dict(dataset=TEXT, tokenizer=CharTokenizer(), calibration_samples=8, calibration_seqlen=32,
                    calibration_batch_size=4, calibration_finetune_steps=0)
    return RBEConfig.from_preset("v2-2", **{**settings, **kw})


def _structured_model(seed: int = 0) -> LlamaForCausalLM:
    """A tiny Llama whose inputs to each layer are strongly correlated (low-rank embeddings),
    as real models' are: the case where calibration matters."""
    torch.manual_seed(seed)
    m = LlamaForCausalLM(tiny_llama_config())
    with torch.no_grad():
        m.model.embed_tokens.weight.copy_(torch.randn(128, 6) @ torch.randn(6, 64))
    return m.eval()


def test_calibrated_model_beats_calibration_free_on_held_out_text():
    ref = _structured_model()
    held_out = torch.tensor([[ord(c) % 128 for c in "the lazy fox runs through a small text"]])
    with torch.no_grad():
        target = ref(held_out).logits
    plain = quantize_model(_structured_model(), RBEConfig.from_preset("v2-2"))
    cal = quantize_model(_structured_model(), _cfg())
    assert isinstance(cal.model.layers[1].mlp.down_proj, RBELinear)
    with torch.no_grad():
        e_plain, e_cal = rel_mse(plain(held_out).logits, target), rel_mse(cal(held_out).logits, target)
    assert e_cal < 0.7 * e_plain, (e_plain, e_cal)
    assert cal.config.quantization_config.calibrated_with["dataset"] == "2 texts"


def test_calibrate_on_load_save_and_reload_bit_identical(tmp_path):
    src = tmp_path / "src"
    _structured_model().save_pretrained(src)
    m = AutoModelForCausalLM.from_pretrained(src, quantization_config=_cfg())
    assert isinstance(m.model.layers[0].self_attn.q_proj, RBELinear)
    ids = torch.tensor([[1, 5, 9, 33, 70, 2]])
    with torch.no_grad():
        logits = m(ids).logits
    m.save_pretrained(tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "config.json").read_text())["quantization_config"]
    assert saved["dataset"] is None and saved["tokenizer"] is None  # the record, not the data
    assert saved["calibrated_with"] == {"dataset": "2 texts", "samples": 8, "seqlen": 32, "seed": 0,
                                        "damp_percent": 0.01, "finetune_steps": 0}
    assert_fresh_reload_identical(tmp_path / "out", ids, logits)


def test_windows_are_deterministic_and_cover_the_text():
    cfg = _cfg()
    a, b = calibration_ids(cfg, CharTokenizer(), 128), calibration_ids(cfg, CharTokenizer(), 128)
    assert a.shape == (8, 32) and torch.equal(a, b)
    assert not torch.equal(a, calibration_ids(_cfg(calibration_seed=1), CharTokenizer(), 128))


def test_bad_calibration_input_is_refused_clearly():
    with pytest.raises(ValueError, match="non-empty list of strings"):
        RBEConfig.from_preset("v2-2", dataset=[])
    with pytest.raises(ValueError, match="fewer than calibration_seqlen=512"):
        calibration_ids(_cfg(calibration_seqlen=512, dataset=["too short"]), CharTokenizer(), 128)
    with pytest.raises(ValueError, match="holds no text"):
        calibration_ids(_cfg(dataset=["   "]), CharTokenizer(), 128)
    with pytest.raises(ValueError, match="vocabulary has 64 entries: is it the model's tokenizer"):
        calibration_ids(_cfg(), CharTokenizer(128), 64)
    with pytest.raises(ValueError, match="calibration needs the model's tokenizer"):
        quantize_model(_structured_model(), _cfg(tokenizer=None))  # a random model has no tokenizer to find
    with pytest.raises(ValueError, match="codec='seed64' takes no dataset"):
        RBEConfig(codec="seed64", dataset=TEXT)


def test_blocks_are_found_in_decoders_and_encoders():
    from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

    assert find_blocks(_structured_model())[0] == "model.layers"
    assert find_blocks(GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2)))[0] == "transformer.h"
    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64))
    assert find_blocks(bert)[0] == "encoder.layer"
