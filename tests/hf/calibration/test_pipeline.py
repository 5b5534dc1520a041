"""Calibrated quantization through transformers: on load and in memory, save/reload, what the config
records, and bad calibration input refused with a clear message."""

import json
from pathlib import Path

import pytest
import torch
from conftest import CharTokenizer, assert_fresh_reload_identical, peaked_llama, rel_mse
from conftest import calibration_config as _cfg
from conftest import structured_model as _structured_model
from transformers import AutoModelForCausalLM

from hf_rbe import RBEConfig, RBELinear, quantize_model
from hf_rbe.core.packed import packed_size
from hf_rbe.hf.calibration.capture import features, find_blocks
from hf_rbe.hf.calibration.finetune import finetune_model
from hf_rbe.hf.calibration.windows import calibration_ids


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
    assert "dataset" not in saved and "tokenizer" not in saved  # the record, not the data
    assert saved["calibrated_with"] == {"dataset": "2 texts", "samples": 8, "seqlen": 32, "seed": 0,
                                        "damp_percent": 0.01, "finetune_steps": 0, "e2e_steps": 0, "fisher": False,
                                        "target_bits": None}
    assert_fresh_reload_identical(tmp_path / "out", ids, logits)


def test_windows_are_deterministic_and_cover_the_text():
    cfg = _cfg()
    a, b = calibration_ids(cfg, CharTokenizer(), 128), calibration_ids(cfg, CharTokenizer(), 128)
    assert a.shape == (8, 32) and torch.equal(a, b)
    assert not torch.equal(a, calibration_ids(_cfg(calibration_seed=1), CharTokenizer(), 128))


def test_bad_calibration_input_is_refused_clearly():
    with pytest.raises(ValueError, match="fewer than calibration_seqlen=512"):
        calibration_ids(_cfg(calibration_seqlen=512, dataset=["too short"]), CharTokenizer(), 128)
    with pytest.raises(ValueError, match="holds no text"):
        calibration_ids(_cfg(dataset=["   "]), CharTokenizer(), 128)
    with pytest.raises(ValueError, match="vocabulary has 64 entries: is it the model's tokenizer"):
        calibration_ids(_cfg(), CharTokenizer(128), 64)
    with pytest.raises(ValueError, match="calibration needs the model's tokenizer"):
        quantize_model(_structured_model(), _cfg(tokenizer=None))  # a random model has no tokenizer to find


def test_blocks_are_found_in_decoders_and_encoders():
    from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

    assert find_blocks(_structured_model())[0] == "model.layers"
    assert find_blocks(GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2)))[0] == "transformer.h"
    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64))
    assert find_blocks(bert)[0] == "encoder.layer"


def _kl(model, ref, batches) -> float:
    with torch.no_grad():
        return sum(float(torch.nn.functional.kl_div(model(b).logits.log_softmax(-1).flatten(0, 1),
                                                    ref(b).logits.log_softmax(-1).flatten(0, 1),
                                                    log_target=True, reduction="batchmean")) for b in batches)


def test_end_to_end_finetune_lowers_the_kl_and_keeps_the_codes():
    ref = peaked_llama()
    batches = list(calibration_ids(_cfg(), CharTokenizer(), 128).split(4))
    with torch.no_grad():
        teacher = [features(ref, b) for b in batches]
    model = quantize_model(peaked_llama(), _cfg())
    codes = {k: v.clone() for k, v in model.state_dict().items() if not v.is_floating_point()}
    before = _kl(model, ref, batches)
    finetune_model(model, batches, teacher, steps=32, lr=1e-3)
    after = _kl(model, ref, batches)
    assert after < 0.8 * before, (before, after)
    assert isinstance(model.model.layers[1].mlp.down_proj, RBELinear)  # RBE layers back in place
    state = model.state_dict()
    assert state.keys() >= codes.keys() and all(torch.equal(state[k], c) for k, c in codes.items())  # codes kept


def test_end_to_end_finetune_of_an_encoder_matches_its_last_hidden_states():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    bert_cfg = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                          vocab_size=128)
    ref = BertModel(bert_cfg).eval()
    model = BertModel(bert_cfg).eval()
    model.load_state_dict(ref.state_dict())
    batches = list(calibration_ids(_cfg(), CharTokenizer(), 128).split(4))
    with torch.no_grad():
        teacher = [features(ref, b) for b in batches]
    assert teacher[0].shape == (4, 32, 64)
    quantize_model(model, _cfg())

    def err() -> float:
        with torch.no_grad():
            return sum(rel_mse(model(b).last_hidden_state, t) for b, t in zip(batches, teacher))

    before = err()
    finetune_model(model, batches, teacher, steps=32, lr=1e-3)
    assert err() < 0.8 * before


def test_calibration_runs_the_end_to_end_finetune_and_records_it():
    # wiring: the pipeline runs the fine-tune (held-out gains are measured on real models, recipes/calibrate.py)
    windows = list(calibration_ids(_cfg(), CharTokenizer(), 128).split(4))
    ref = peaked_llama()
    block_only = quantize_model(peaked_llama(), _cfg(calibration_finetune_steps=8))
    e2e = quantize_model(peaked_llama(), _cfg(calibration_finetune_steps=8, calibration_e2e_steps=32,
                                         calibration_e2e_lr=1e-3))
    e_block, e_e2e = _kl(block_only, ref, windows), _kl(e2e, ref, windows)
    assert e_e2e < 0.95 * e_block, (e_block, e_e2e)  # equal if the fine-tune never ran
    assert e2e.config.quantization_config.calibrated_with["e2e_steps"] == 32


@pytest.mark.parametrize("field,value", [("calibration_e2e_steps", -1), ("calibration_e2e_steps", True),
                                         ("calibration_e2e_steps", 2.0), ("calibration_e2e_lr", 0),
                                         ("calibration_e2e_lr", float("nan")), ("calibration_e2e_lr", float("inf")),
                                         ("calibration_finetune_lr", True), ("calibration_code_steps", -1),
                                         ("calibration_code_steps", None), ("calibration_code_steps", 1.0)])
def test_bad_finetune_settings_are_refused(field, value):
    with pytest.raises(ValueError, match=field):
        _cfg(**{field: value})


def test_a_reused_config_gives_the_second_model_what_a_fresh_one_would():
    # bit allocation chooses per-layer planes: into the model's copy of the config, never the caller's
    uniform = packed_size(quantize_model(_structured_model(), _cfg()))["bits_per_weight"]
    c = _cfg(target_bits=uniform + 3.0)
    first = quantize_model(_structured_model(0), c)
    second = quantize_model(_structured_model(1), c)
    fresh = quantize_model(_structured_model(1), _cfg(target_bits=uniform + 3.0))
    assert c.overrides == {} and c.calibrated_with is None
    assert first.config.quantization_config is not c and first.config.quantization_config.overrides
    assert second.config.quantization_config.to_dict() == fresh.config.quantization_config.to_dict()
    assert second.state_dict().keys() == fresh.state_dict().keys()
    assert all(torch.equal(v, fresh.state_dict()[k]) for k, v in second.state_dict().items())


def test_an_interrupt_in_the_end_to_end_finetune_leaves_the_model_as_it_was(monkeypatch):
    import hf_rbe.hf.calibration.finetune as finetune

    m = _structured_model()
    before = {n: (p.requires_grad, p.detach().clone()) for n, p in m.named_parameters()}
    kinds = {n: type(x) for n, x in m.named_modules()}
    real, calls = finetune.logits, []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) > 3:
            raise KeyboardInterrupt("stopped")
        return real(*a, **k)

    monkeypatch.setattr(finetune, "logits", interrupted)
    with pytest.raises(KeyboardInterrupt):
        quantize_model(m, _cfg(calibration_e2e_steps=8, calibration_e2e_lr=1e-3))
    assert len(calls) > 3  # the fine-tune was running
    assert {n: type(x) for n, x in m.named_modules()} == kinds
    after = dict(m.named_parameters())
    assert {n: p.requires_grad for n, p in after.items()} == {n: rg for n, (rg, _) in before.items()}
    assert all(torch.equal(after[n], v) for n, (_, v) in before.items())


def _gpt2(positions: int = 64):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=positions)).eval()


def _nan_activations():
    m = _structured_model()
    with torch.no_grad():
        m.model.layers[1].post_attention_layernorm.weight[3] = float("inf")  # finite weights to encode, inf after it
    return m


@pytest.mark.parametrize("model,settings,match", [
    (_gpt2, dict(calibration_seqlen=128), "longer than the model's 64 positions"),
    (_structured_model, dict(calibration_seqlen=128), "longer than the model's 64 positions"),
    (_structured_model, dict(dataset={"text": ["some text " * 40, None]}), "calibration text 1 is NoneType"),
    (_structured_model, dict(dataset={"text": [5, 7]}), "calibration text 0 is int"),
    (_structured_model, dict(tokenizer=lambda text: [1, 2, 3]), "cannot be called as a transformers tokenizer"),
    (lambda: _structured_model().to("meta"), {}, "on the meta device"),
    (_nan_activations, {}, "layers.1.mlp.gate_proj: its calibration inputs hold NaN/Inf"),
], ids=["gpt2-positions", "llama-positions", "none-text", "int-text", "other-callable", "meta", "nan-activations"])
def test_calibration_input_that_broke_inside_is_refused_with_a_message(model, settings, match):
    if isinstance(settings.get("dataset"), dict):
        from datasets import Dataset

        settings = {**settings, "dataset": Dataset.from_dict(settings["dataset"])}
    m = model()
    before = {k: v.clone() for k, v in m.state_dict().items()} if next(m.parameters()).device.type != "meta" else {}
    with pytest.raises(ValueError, match=match):
        quantize_model(m, _cfg(**settings))
    after = m.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items() if v.isfinite().all())


def test_a_hessian_that_damping_cannot_make_positive_definite_names_the_layer():
    from hf_rbe import EncodingError
    from hf_rbe.hf.replace import LayerFactory, encode_weight

    m = _structured_model()
    name = "model.layers.0.mlp.down_proj"
    module = m.get_submodule(name)
    layer = LayerFactory(_cfg(), {name: module}).build(name, module)
    with pytest.raises(EncodingError, match=f"{name}: its calibration Hessian is not positive-definite"):
        u = torch.nn.functional.normalize(torch.randn(module.in_features), dim=0)
        indefinite = torch.eye(module.in_features) - 3 * torch.outer(u, u)  # positive diagonal, eigenvalue -2
        encode_weight(layer, module.weight.detach(), name, indefinite, damp=0.01)


@pytest.mark.parametrize("settings", [dict(calibration_e2e_steps=4, calibration_e2e_lr=1e30),
                                      dict(calibration_finetune_steps=4, calibration_finetune_lr=1e30)],
                         ids=["end-to-end", "per-block"])
def test_a_diverging_finetune_is_an_error_and_leaves_the_model_as_it_was(settings):
    from hf_rbe import EncodingError

    m = _structured_model()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(EncodingError, match="fine-tune diverged"):
        quantize_model(m, _cfg(**settings))
    assert all(torch.equal(m.state_dict()[k], v) for k, v in before.items())


def test_a_checkpoint_is_never_quantized_onto_itself(tiny_llama_dir, tmp_path):
    import shutil

    from hf_rbe import quantize_checkpoint

    src = shutil.copytree(tiny_llama_dir, tmp_path / "m")
    link = tmp_path / "link"
    link.symlink_to(src)
    for out in (src, link):
        with pytest.raises(ValueError, match="is the source checkpoint"):
            quantize_checkpoint(src, out, RBEConfig.from_preset("v2-3"))
    assert sorted(p.name for p in src.iterdir()) == sorted(p.name for p in Path(tiny_llama_dir).iterdir())


def test_calibration_computes_with_the_reference_op_so_any_kernel_gives_the_same_codes(monkeypatch):
    """Kernels differ from the reference in the last bits and LDLQ's choices flip under such
    differences: calibration must not call them, or its codes would depend on the machine's kernels."""
    from hf_rbe.kernels import cpu_numba, dispatch

    calls = []
    real = cpu_numba.linear
    monkeypatch.setattr(cpu_numba, "linear", lambda *a: calls.append(1) or real(*a))
    with_kernel = quantize_model(_structured_model(), _cfg(calibration_finetune_steps=2, calibration_e2e_steps=2))
    assert not calls, "calibration called the CPU kernel"
    with torch.no_grad():
        with_kernel(torch.tensor([[1, 5, 9]]))
    assert calls, "outside calibration the model must compute with the CPU kernel"
    monkeypatch.setattr(dispatch, "CPU_KERNELS", {})
    without = quantize_model(_structured_model(), _cfg(calibration_finetune_steps=2, calibration_e2e_steps=2))
    a, b = with_kernel.state_dict(), without.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
