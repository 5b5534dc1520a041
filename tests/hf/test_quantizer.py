"""transformers integration: quantize on load, save, reload, skips, overrides, bad checkpoints."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import assert_fresh_reload_identical, rel_mse
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM

import hf_rbe
from hf_rbe import RBEConfig, RBELinear

IDS = torch.tensor([[1, 5, 9, 33, 70, 2, 100, 3]])


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.fixture(scope="module")
def quantized(tiny_llama_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=RBEConfig())


def test_quantize_on_load(tiny_llama_dir, quantized):
    ref = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    layers = {n: m for n, m in quantized.named_modules() if isinstance(m, RBELinear)}
    assert len(layers) == 14  # 7 projections x 2 layers
    assert type(quantized.lm_head) is nn.Linear  # default skip kept
    owners = [m for m in layers.values() if m.owns_table]
    assert len(owners) == 1  # one shared table for the whole model
    ref_mods = dict(ref.named_modules())
    for name, m in layers.items():
        assert rel_mse(m.dequantize(), ref_mods[name].weight) < 0.1
    assert rel_mse(_logits(quantized), _logits(ref)) < 0.2
    assert quantized.is_quantized and quantized.config.quantization_config.quant_method == "rbe"


def test_save_and_reload_in_fresh_process_is_bit_identical(tmp_path, quantized):
    quantized.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "rbe"
    assert_fresh_reload_identical(tmp_path, IDS, _logits(quantized))


def test_reload_without_import_fails_loudly(tmp_path, quantized):
    quantized.save_pretrained(tmp_path)
    code = (
        "from transformers import AutoModelForCausalLM;"
        f"AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    assert "mismatch" in res.stderr.lower() or "size" in res.stderr.lower(), res.stderr[-1500:]


def test_user_skips_are_merged_with_defaults_and_overrides_apply(tiny_llama_dir):
    cfg = RBEConfig(idx=7, modules_to_not_convert=["mlp.down_proj"], overrides={"*.self_attn.v_proj": {"idx": 9}})
    m = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=cfg)
    assert type(m.lm_head) is nn.Linear
    assert type(m.model.layers[0].mlp.down_proj) is nn.Linear
    v, q = m.model.layers[1].self_attn.v_proj, m.model.layers[1].self_attn.q_proj
    assert v.spec.stage.layout.idx == 9 and q.spec.stage.layout.idx == 7
    v0 = m.model.layers[0].self_attn.v_proj
    assert v0.owns_table and not v.owns_table and v.table_key == v0.table_key != q.table_key
    assert torch.equal(v.table, v0.table)


def test_unfit_shapes_fall_back_with_warning(tiny_llama_dir, caplog):
    with caplog.at_level("WARNING", logger="hf_rbe.hf.replace"):
        m = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=RBEConfig(group_size=48))
    assert not any(isinstance(x, RBELinear) for x in m.modules())  # 64 and 128 are not multiples of 48
    kept = [r.getMessage() for r in caplog.records if "keeping" in r.getMessage()]
    assert len(kept) == 14 and "model.layers.0.self_attn.q_proj" in kept[0] and "group_size 48" in kept[0]
    assert any("no Linear layer was converted" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models(tiny_llama_dir, dtype):
    m = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=RBEConfig(), dtype=dtype)
    layer = m.model.layers[0].mlp.up_proj
    assert isinstance(layer, RBELinear) and layer.compute_dtype == dtype
    assert _logits(m).dtype == dtype and torch.isfinite(_logits(m)).all()


def test_model_dequantize(tiny_llama_dir, quantized):
    m = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=RBEConfig())
    before = _logits(m)
    m.dequantize()
    assert not any(isinstance(x, RBELinear) for x in m.modules())
    assert rel_mse(_logits(m), before) < 1e-10


def test_gpt2_conv1d(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=1, n_head=4, vocab_size=100, n_positions=32)).save_pretrained(tmp_path)
    ref = GPT2LMHeadModel.from_pretrained(tmp_path)
    m = GPT2LMHeadModel.from_pretrained(tmp_path, quantization_config=RBEConfig.from_preset("rbe-3"))
    attn = m.transformer.h[0].attn.c_attn
    assert isinstance(attn, RBELinear) and attn.in_features == 64 and attn.out_features == 192
    assert rel_mse(attn.dequantize(), ref.transformer.h[0].attn.c_attn.weight.T) < 0.05
    ids = torch.tensor([[1, 2, 3, 4]])
    assert rel_mse(m(ids).logits, ref(ids).logits) < 0.05


def _tamper(dirpath, fn):
    path = os.path.join(dirpath, "model.safetensors")
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_tampered_checkpoints_are_refused(tmp_path, quantized):
    quantized.save_pretrained(tmp_path / "a")
    key = next(k for k in load_file(tmp_path / "a" / "model.safetensors") if k.endswith("q_proj.scale"))
    _tamper(tmp_path / "a", lambda t: t[key].fill_(float("nan")))
    with pytest.raises(hf_rbe.FormatError, match="NaN"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "a")

    quantized.save_pretrained(tmp_path / "b")
    key = next(k for k in load_file(tmp_path / "b" / "model.safetensors") if k.endswith("up_proj.weight"))
    _tamper(tmp_path / "b", lambda t: t.__setitem__(key, t[key][:, :-1].contiguous()))
    with pytest.raises(Exception, match="(?i)size|shape"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "b")

    quantized.save_pretrained(tmp_path / "c")
    path = tmp_path / "c" / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(Exception, match="(?i)incomplete|truncat|deserializ|invalid|metadata"):
        AutoModelForCausalLM.from_pretrained(tmp_path / "c")


def test_quantize_model_in_memory_then_save_and_reload(tiny_llama_dir, tmp_path):
    m = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    ref = _logits(m)
    hf_rbe.quantize_model(m, RBEConfig.from_preset("rbe-3"), modules_to_not_convert=["lm_head"])
    assert isinstance(m.model.layers[0].self_attn.q_proj, RBELinear)
    assert rel_mse(_logits(m), ref) < 0.1
    m.save_pretrained(tmp_path)  # the model carries its quantization config, as after from_pretrained
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(_logits(again), _logits(m))


def test_registration_is_idempotent():
    import importlib

    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING

    importlib.reload(hf_rbe)
    hf_rbe._register()
    hf_rbe.hf.register()
    assert AUTO_QUANTIZER_MAPPING["rbe"] is hf_rbe.hf.RBEHfQuantizer


def test_new_task_heads_stay_full_precision(tmp_path):
    # a fresh classification head has no checkpoint weight to quantize; it must load, untouched
    from transformers import AutoModelForSequenceClassification, BertConfig, BertModel

    cfg = BertConfig(vocab_size=64, hidden_size=64, num_hidden_layers=1, num_attention_heads=4, intermediate_size=128)
    BertModel(cfg).save_pretrained(tmp_path)
    m = AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=2, quantization_config=RBEConfig())
    assert type(m.classifier) is nn.Linear
    assert isinstance(m.bert.encoder.layer[0].attention.self.query, RBELinear)
    assert m(torch.tensor([[1, 2, 3]])).logits.shape == (1, 2)


