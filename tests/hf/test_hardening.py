"""Nothing lost, nothing silently wrong (issue #14): one test per failure mode a careful user hit.

Each test names the finding it pins (1-10 of the issue). Loading checks are described in
``hf_rbe.hf.integrity``; the fuzz test at the end mutates saved checkpoints at random.
"""

import errno
import io
import json
import logging
import pickle
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import hf_rbe
from hf_rbe import FormatError, RBEConfig, RBELinear

IDS = torch.tensor([[1, 5, 9, 33, 70, 2, 100, 3]])


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.fixture(scope="module")
def saved(tiny_llama_dir, tmp_path_factory):
    """{preset: (checkpoint dir, logits)} for a v2 and a v1 preset with a residual stage."""
    out = {}
    for preset in ("v2-3", "rbe-5"):
        d = tmp_path_factory.mktemp(preset)
        m = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=RBEConfig.from_preset(preset))
        m.save_pretrained(d)
        out[preset] = (d, _logits(m))
    return out


def _copy(src, dst, tensors=None, config=None, keep_record=True):
    """A copy of checkpoint ``src`` with its tensors (``tensors(dict)``) and/or config.json
    (``config(dict)``) edited in place; ``keep_record=False`` drops hf-rbe's metadata (an old checkpoint)."""
    shutil.copytree(src, dst)
    if tensors is not None or not keep_record:
        path = dst / "model.safetensors"
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        t = load_file(path)
        if tensors is not None:
            tensors(t)
        save_file(t, path, metadata=meta if keep_record else {"format": "pt"})
    if config is not None:
        c = json.loads((dst / "config.json").read_text())
        config(c)
        (dst / "config.json").write_text(json.dumps(c))
    return dst


def _key(d, suffix):
    return next(k for k in load_file(d / "model.safetensors") if k.endswith(suffix))


# ----------------------------------------------------------------------------- 1. dtypes


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_1_half_precision_load_quantize_save_reload(tiny_llama_dir, saved, tmp_path, dtype):
    d, _ = saved["v2-3"]
    m = AutoModelForCausalLM.from_pretrained(d, dtype=dtype)
    assert m.model.layers[0].self_attn.q_proj.scale.dtype == torch.float16  # stored dtypes kept
    assert m.model.layers[0].self_attn.q_proj.table.dtype == torch.float32
    q = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=dtype, quantization_config=RBEConfig())
    q.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)  # plain reload, dtype from config.json
    assert again.dtype == dtype and torch.equal(_logits(again), _logits(q))


def test_1_model_casts_keep_the_stored_dtypes(saved, tmp_path):
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


# ----------------------------------------------------------------------------- 2. all or nothing


@pytest.mark.parametrize("calibrated", [False, True])
def test_2_failed_quantize_model_leaves_the_model_as_it_was(tiny_llama_dir, calibrated):
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


# ----------------------------------------------------------------------------- 3. stored tensors


@pytest.mark.parametrize("case,edit,match", [
    ("missing seed", lambda t, k: t.pop(k["seed"]), "lacks 'rotation_seed'"),
    ("float64 seed", lambda t, k: t.__setitem__(k["seed"], t[k["seed"]].double()), "F64"),
    ("float32 codes", lambda t, k: t.__setitem__(k["codes"], t[k["codes"]].float()), "F32"),
    ("uint8 codes", lambda t, k: t.__setitem__(k["codes"], t[k["codes"]].to(torch.uint8)), "U8"),
    ("int32 scales", lambda t, k: t.__setitem__(k["scale"], t[k["scale"]].int()), "I32"),
    ("missing table", lambda t, k: t.pop(k["table"]), "lacks 'table'"),
])
def test_3_missing_or_mistyped_tensors_are_refused(saved, tmp_path, case, edit, match):
    d, _ = saved["v2-3"]
    keys = {"seed": _key(d, "down_proj.rotation_seed"), "codes": _key(d, "q_proj.weight"),
            "scale": _key(d, "q_proj.scale"), "table": _key(d, ".table")}
    for record in (True, False):  # with hf-rbe's record and as an old checkpoint without one
        bad = _copy(d, tmp_path / f"{record}", tensors=lambda t: edit(t, keys), keep_record=record)
        with pytest.raises(FormatError, match=match):
            AutoModelForCausalLM.from_pretrained(bad)


# ----------------------------------------------------------------------------- 4. load_state_dict


def test_4_load_state_dict_rebuilds_rotation_signs_and_checks_dtypes(tiny_llama_dir, saved):
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


# ----------------------------------------------------------------------------- 5. config tied to tensors


@pytest.mark.parametrize("preset,edit", [
    ("v2-3", lambda q: q.update(rotation_block=32)),
    ("v2-3", lambda q: q.update(rotation=False)),
    ("v2-3", lambda q: q.update(overrides={"*q_proj": {"rotation": False}})),
    ("v2-3", lambda q: q.update(planes=["e8p", "vq4"])),
    ("v2-3", lambda q: q.update(group_size=32)),
    ("rbe-5", lambda q: q.update(residual="none", residual_stage=None)),
    ("rbe-5", lambda q: q.update(idx=8, amp=1)),  # field widths moved, same total
    ("rbe-5", lambda q: q.update(table="per_layer")),
])
def test_5_config_edits_that_change_decoding_are_refused(saved, tmp_path, preset, edit):
    d, ref = saved[preset]
    bad = _copy(d, tmp_path / "bad", config=lambda c: edit(c["quantization_config"]))
    try:
        out = _logits(AutoModelForCausalLM.from_pretrained(bad))
    except (FormatError, ValueError, RuntimeError):
        return
    assert torch.equal(out, ref), "an edited config.json loaded and changed the outputs"


def test_5_harmless_config_edits_still_load(saved, tmp_path):
    d, ref = saved["v2-3"]
    ok = _copy(d, tmp_path / "ok", config=lambda c: c["quantization_config"].update(calibration_samples=8))
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(ok)), ref)


# ----------------------------------------------------------------------------- 6. pickle


@pytest.mark.parametrize("preset", ["v2-3", "rbe-5"])
def test_6_pickle_and_torch_save_round_trip(saved, tmp_path, preset):
    d, ref = saved[preset]
    m = AutoModelForCausalLM.from_pretrained(d)
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    again = torch.load(buf, weights_only=False)  # the user's own pickle: their choice to unpickle it
    assert torch.equal(_logits(again), ref)
    assert torch.equal(_logits(pickle.loads(pickle.dumps(m))), ref)
    again.save_pretrained(tmp_path)  # the card hook survived and points at the copy
    assert (tmp_path / "README.md").exists()
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path)), ref)


# ----------------------------------------------------------------------------- 7. atomic save


def test_7_a_failed_save_over_a_checkpoint_leaves_the_old_one(saved, tiny_llama_dir, tmp_path, monkeypatch):
    import safetensors.torch
    import transformers.modeling_utils

    d, ref = saved["v2-3"]
    target = _copy(d, tmp_path / "ckpt")
    (target / "tokenizer.json").write_text("{}")  # a file of the user's: kept
    newer = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=RBEConfig.from_preset("v2-2"))
    real = safetensors.torch.save_file

    def disk_full(tensors, filename, metadata=None):
        real(dict(list(tensors.items())[:3]), filename, metadata=metadata)  # part of the file, then the error
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", disk_full)
    with pytest.raises(OSError, match="No space"):
        newer.save_pretrained(target)
    monkeypatch.undo()
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(target)), ref)
    assert (target / "tokenizer.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no staging directory left behind
    newer.save_pretrained(target)  # and a save that succeeds replaces it
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(target)), _logits(newer))
    assert (target / "tokenizer.json").exists()


def test_7_sharded_then_single_file_save_leaves_no_stale_shards(saved, tmp_path):
    d, ref = saved["v2-3"]
    m = AutoModelForCausalLM.from_pretrained(d)
    m.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    m.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.glob("model*")) == ["model.safetensors"]
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path)), ref)


def test_7_saving_onto_a_file_is_refused(saved, tmp_path):
    m = AutoModelForCausalLM.from_pretrained(saved["v2-3"][0])
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError):
        m.save_pretrained(tmp_path / "f")


# ----------------------------------------------------------------------------- 8. scale underflow


@pytest.mark.parametrize("preset", ["v2-3", "rbe-3"])
def test_8_tiny_weights_are_refused_not_zeroed(tiny_llama_dir, preset):
    m = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    with torch.no_grad():
        m.model.layers[0].self_attn.q_proj.weight.mul_(1e-9)
    with pytest.raises(FormatError, match="q_proj.*underflow fp16"):
        hf_rbe.quantize_model(m, RBEConfig.from_preset(preset))


def test_8_zero_rows_and_small_weights_still_encode(tiny_llama_dir):
    m = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    with torch.no_grad():
        m.model.layers[0].self_attn.q_proj.weight[:4] = 0
        m.model.layers[0].mlp.up_proj.weight.mul_(1e-3)  # weights ~2e-5: subnormal fp16 scales, kept
    hf_rbe.quantize_model(m, RBEConfig.from_preset("v2-3"))
    w = m.model.layers[0].self_attn.q_proj.dequantize()
    assert torch.equal(w[:4], torch.zeros_like(w[:4]))
    assert w[4:].abs().sum() > 0


# ----------------------------------------------------------------------------- 9. dequantize + save


def test_9_dequantize_then_save(saved, tmp_path):
    d, ref = saved["v2-3"]
    m = AutoModelForCausalLM.from_pretrained(d)
    m.dequantize()
    m.save_pretrained(tmp_path)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert not any(isinstance(x, RBELinear) for x in plain.modules())
    assert torch.allclose(_logits(plain), ref, atol=1e-4)


# ----------------------------------------------------------------------------- 10. smaller findings


def test_10_out_of_range_values_are_refused_in_old_checkpoints(saved, tmp_path):
    """Without hf-rbe's record (an old checkpoint) value checks still catch what decodes to garbage."""
    d, _ = saved["rbe-5"]
    lut, seed = _key(d, ".lut"), _key(d, "q_proj.rotation_seed")
    bad = _copy(d, tmp_path / "lut", tensors=lambda t: t[lut].mul_(1e30), keep_record=False)
    with pytest.raises(FormatError, match="'lut' holds entries beyond"):
        AutoModelForCausalLM.from_pretrained(bad)
    bad = _copy(d, tmp_path / "seed", tensors=lambda t: t[seed].fill_(-5), keep_record=False)
    with pytest.raises(FormatError, match="negative"):
        AutoModelForCausalLM.from_pretrained(bad)


def test_10_old_checkpoints_load_with_a_warning(saved, tmp_path, caplog):
    d, ref = saved["v2-3"]
    old = _copy(d, tmp_path / "old", keep_record=False)
    with caplog.at_level(logging.WARNING, logger="hf_rbe"):
        assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(old)), ref)
    assert "no hf-rbe record" in caplog.text


def test_10_pickle_checkpoints_are_never_read(saved, tmp_path, monkeypatch):
    d, _ = saved["v2-3"]
    bad = _copy(d, tmp_path / "bin")
    state = load_file(bad / "model.safetensors")
    (bad / "model.safetensors").unlink()
    torch.save(state, bad / "pytorch_model.bin")
    calls = []
    real = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: calls.append(a) or real(*a, **k))
    with pytest.raises(FormatError, match="safetensors checkpoints only"):
        AutoModelForCausalLM.from_pretrained(bad, use_safetensors=False)
    assert calls == []


def test_10_triton_kernels_on_cpu_tensors_say_what_to_do(monkeypatch):
    pytest.importorskip("triton")
    from hf_rbe.kernels import triton_v2

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    layer = RBELinear.from_linear(torch.nn.Linear(64, 16), RBEConfig.from_preset("v2-3").base_spec())
    tensors, layout = layer.op_args()
    with pytest.raises(RuntimeError, match="need CUDA tensors.*numba"):
        triton_v2.linear(torch.randn(2, 64), tensors, layout, None)


@pytest.mark.parametrize("kw,match", [
    (dict(dim=True), "dim"),
    (dict(group_size=8.0, planes=["e8p"]), "group_size"),
    (dict(format_version=0), "format_version"),
    (dict(format_version=-7), "format_version"),
    (dict(format_version="1"), "format_version must be a positive int"),
    (dict(modules_to_not_convert="lm_head"), r"list of module names.*\['lm_head'\]"),
    (dict(modules_to_not_convert=["(["]), "not a valid regular expression"),
    (dict(overrides={"*q_proj": {"rotation": "no"}}), "rotation must be a bool"),
    (dict(rotation_seed=-1), "rotation_seed"),
    (dict(calibration_samples=True), "calibration_samples"),
])
def test_10_config_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        RBEConfig(**kw)


def test_10_overrides_that_match_nothing_warn(tiny_llama_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="hf_rbe"):
        AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=RBEConfig(
            overrides={"*.dense_4h_to_h": {"group_size": 64}}))
    assert "'*.dense_4h_to_h' matches none" in caplog.text


# ----------------------------------------------------------------------------- fuzz


def _presets():
    from hypothesis import strategies as st

    return st.sampled_from(["v2-3", "rbe-5"])


def _mutations():
    """A hypothesis strategy of one edit to a saved checkpoint: (kind, details)."""
    from hypothesis import strategies as st

    tensor_ops = st.sampled_from(["flip_bit", "set_value", "cast", "drop", "slice", "scale", "nan"])
    config_values = st.one_of(st.integers(-3, 300), st.booleans(), st.none(), st.sampled_from(
        ["none", "rbe", "int4", "per_layer", "universal", "e8p", "1", ["e8p"], ["e8p", "vq4"], ["vq8", "e8p"],
         {"*q_proj": {"rotation": False}}, {"*": {"group_size": 32}}, {"dim": 4, "idx": 8, "sign": 1, "amp": 2}]))
    config_fields = st.sampled_from(
        ["rotation", "rotation_block", "rotation_seed", "table", "table_seed", "planes", "group_size", "format_version",
         "residual", "residual_stage", "residual_group_size", "overrides", "dim", "idx", "sign", "amp", "codec",
         "tile", "embedding_dtype", "modules_to_not_convert"])
    return st.one_of(
        st.tuples(st.just("tensor"), tensor_ops, st.integers(0, 10**6), st.integers(0, 10**6)),
        st.tuples(st.just("config"), config_fields, config_values, st.just(0)))


def _apply_mutation(d, mutation):
    kind, what, a, b = mutation
    if kind == "config":
        def edit(c):
            c["quantization_config"][what] = a
        return lambda out: _copy(d, out, config=edit)
    packed = sorted(k for k in load_file(d / "model.safetensors") if "layers." in k and not k.endswith("norm.weight")
                    and ("_proj." in k))
    key = packed[a % len(packed)]

    def edit(t):
        x = t[key]
        flat = x.reshape(-1)
        i = b % flat.numel()
        if what == "flip_bit":
            raw = flat.view(torch.uint8 if x.element_size() == 1 else torch.int16 if x.element_size() == 2
                            else torch.int32 if x.element_size() == 4 else torch.int64)
            raw[i] ^= 1 << (b % (8 * x.element_size() - 1))
        elif what == "set_value":
            flat[i] = b % 100 if not x.is_floating_point() else (b % 1000) / 100 - 5
        elif what == "cast":
            t[key] = x.float() if x.dtype != torch.float32 else x.half()
        elif what == "drop":
            del t[key]
        elif what == "slice":
            t[key] = x[..., :-1].contiguous() if x.shape[-1] > 1 else x[:-1].contiguous()
        elif what == "scale" and x.is_floating_point():
            x.mul_(1 + (b % 7))
        elif what == "nan" and x.is_floating_point():
            flat[i] = float("nan")
    return lambda out: _copy(d, out, tensors=edit)


def test_fuzz_a_tampered_checkpoint_is_refused_or_identical(saved, tmp_path_factory):
    """Random edits of stored tensors and config fields: loading refuses, or the logits are the
    untampered model's bit for bit (never a model that loads and computes something else)."""
    from hypothesis import HealthCheck, given, settings

    outcomes = {"refused": 0, "identical": 0}

    @settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(preset=_presets(), mutation=_mutations())
    def run(preset, mutation):
        d, ref = saved[preset]
        out = _apply_mutation(d, mutation)(tmp_path_factory.mktemp("fuzz") / "ckpt")
        try:
            logits = _logits(AutoModelForCausalLM.from_pretrained(out))
        except Exception:  # noqa: BLE001 - any refusal is fine; what matters is that nothing loads wrong
            outcomes["refused"] += 1
            return
        assert torch.equal(logits, ref), f"{preset} {mutation}: loaded and computes something else"
        outcomes["identical"] += 1

    run()
    assert outcomes["refused"] > 10 and outcomes["identical"] > 0, outcomes  # both branches exercised
