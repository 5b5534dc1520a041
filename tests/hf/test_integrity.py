"""A checkpoint that verifies itself (``hf_rbe.hf.integrity``): missing, mistyped, out-of-range or
tampered tensors and config edits that change decoding are refused before a value is used; old
checkpoints load with the checks they can have; pickles are never read."""

import logging

import pytest
import torch
from conftest import edited_copy as _copy
from conftest import logits_of as _logits
from conftest import stored_key as _key
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from hf_rbe import FormatError


@pytest.mark.parametrize("case,edit,match", [
    ("missing seed", lambda t, k: t.pop(k["seed"]), "lacks 'rotation_seed'"),
    ("float64 seed", lambda t, k: t.__setitem__(k["seed"], t[k["seed"]].double()), "F64"),
    ("float32 codes", lambda t, k: t.__setitem__(k["codes"], t[k["codes"]].float()), "F32"),
    ("uint8 codes", lambda t, k: t.__setitem__(k["codes"], t[k["codes"]].to(torch.uint8)), "U8"),
    ("int32 scales", lambda t, k: t.__setitem__(k["scale"], t[k["scale"]].int()), "I32"),
    ("missing table", lambda t, k: t.pop(k["table"]), "lacks 'table'"),
])
def test_missing_or_mistyped_tensors_are_refused(saved, tmp_path, case, edit, match):
    d, _ = saved["v2-3"]
    keys = {"seed": _key(d, "down_proj.rotation_seed"), "codes": _key(d, "q_proj.weight"),
            "scale": _key(d, "q_proj.scale"), "table": _key(d, ".table")}
    for record in (True, False):  # with hf-rbe's record and as an old checkpoint without one
        bad = _copy(d, tmp_path / f"{record}", tensors=lambda t: edit(t, keys), keep_record=record)
        with pytest.raises(FormatError, match=match):
            AutoModelForCausalLM.from_pretrained(bad)


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
def test_config_edits_that_change_decoding_are_refused(saved, tmp_path, preset, edit):
    d, ref = saved[preset]
    bad = _copy(d, tmp_path / "bad", config=lambda c: edit(c["quantization_config"]))
    try:
        out = _logits(AutoModelForCausalLM.from_pretrained(bad))
    except (FormatError, ValueError, RuntimeError):
        return
    assert torch.equal(out, ref), "an edited config.json loaded and changed the outputs"


def test_harmless_config_edits_still_load(saved, tmp_path):
    d, ref = saved["v2-3"]
    ok = _copy(d, tmp_path / "ok", config=lambda c: c["quantization_config"].update(calibration_samples=8))
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(ok)), ref)


def test_out_of_range_values_are_refused_in_old_checkpoints(saved, tmp_path):
    """Without hf-rbe's record (an old checkpoint) value checks still catch what decodes to garbage."""
    d, _ = saved["rbe-5"]
    lut, seed = _key(d, ".lut"), _key(d, "q_proj.rotation_seed")
    bad = _copy(d, tmp_path / "lut", tensors=lambda t: t[lut].mul_(1e30), keep_record=False)
    with pytest.raises(FormatError, match="'lut' holds entries beyond"):
        AutoModelForCausalLM.from_pretrained(bad)
    bad = _copy(d, tmp_path / "seed", tensors=lambda t: t[seed].fill_(-5), keep_record=False)
    with pytest.raises(FormatError, match="negative"):
        AutoModelForCausalLM.from_pretrained(bad)


def test_a_sign_plane_checkpoint_reloads_and_its_table_is_checked(tiny_llama_dir, tmp_path):
    from hf_rbe import RBEConfig

    m = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=RBEConfig.from_preset("v2-b3"))
    m.save_pretrained(tmp_path / "b3")
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "b3")), _logits(m))
    table = _key(tmp_path / "b3", "residual2_table")
    bad = _copy(tmp_path / "b3", tmp_path / "neg", tensors=lambda t: t[table].neg_(), keep_record=False)
    with pytest.raises(FormatError, match="not a b1 table"):
        AutoModelForCausalLM.from_pretrained(bad)


def test_old_checkpoints_load_with_a_warning(saved, tmp_path, caplog):
    d, ref = saved["v2-3"]
    old = _copy(d, tmp_path / "old", keep_record=False)
    with caplog.at_level(logging.WARNING, logger="hf_rbe"):
        assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(old)), ref)
    assert "no hf-rbe record" in caplog.text


def test_pickle_checkpoints_are_never_read(saved, tmp_path, monkeypatch):
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


@pytest.mark.parametrize("edit,match", [
    (lambda q: q.update(modules_to_not_convert=5), "modules_to_not_convert must be a list"),
    (lambda q: q.update(modules_to_not_convert=[["lm_head"]]), "modules_to_not_convert must be a list"),
    (lambda q: q.update(overrides=["*.q_proj"]), "overrides must map glob patterns"),
    (lambda q: q.update(overrides={"*.q_proj": 3}), "overrides must map glob patterns|override"),
])
def test_hand_edited_config_fields_of_the_wrong_type_are_named(saved, tmp_path, edit, match):
    bad = _copy(saved["v2-3"][0], tmp_path / "bad", config=lambda c: edit(c["quantization_config"]))
    with pytest.raises(ValueError, match=match):
        AutoModelForCausalLM.from_pretrained(bad)


def test_a_deeply_nested_record_is_refused_as_tampered(saved, tmp_path):
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    from hf_rbe.hf.integrity import METADATA_KEY

    d = _copy(saved["v2-3"][0], tmp_path / "deep")
    path = d / "model.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    record = json.loads(meta[METADATA_KEY])
    record["layers"]["model.layers.0.self_attn.q_proj"]["extra"] = "X"
    text = json.dumps(record).replace('"X"', "[" * 100_000 + "]" * 100_000)
    save_file(load_file(path), path, metadata={**meta, METADATA_KEY: text})
    with pytest.raises(FormatError, match="unreadable hf-rbe record"):
        AutoModelForCausalLM.from_pretrained(d)
