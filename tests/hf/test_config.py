"""``RBEConfig``: every setting is checked in the constructor, the format is chosen explicitly, a
setting the chosen format does not use is refused, saved configs hold what the checkpoint needs
and old ones keep loading, and copies are independent."""

import copy

import pytest

import hf_rbe  # noqa: F401  (registers the quantizer)
from hf_rbe import RBEConfig
from hf_rbe.core.errors import ConfigError
from hf_rbe.hf.config import DEFAULT_PRESET, PRESETS

# ----------------------------------------------------------------------------- the format


def test_default_is_the_measured_preset():
    # docs/results/calibrate.md "Choosing the default": the fewest-bit v2 preset with calibrated MiniLM
    # cosine >= 0.99 and SmolLM2 within 10% of fp32
    assert DEFAULT_PRESET == "v2-6"
    assert RBEConfig().base_spec() == RBEConfig.from_preset(DEFAULT_PRESET).base_spec()
    assert RBEConfig(format_version=2).base_spec() == RBEConfig().base_spec()


def test_the_format_is_chosen_by_what_is_asked_not_by_default_values():
    assert RBEConfig().format_version == 2
    assert RBEConfig(planes=["e8p"]).format_version == 2
    # any format-1 field asks for format 1, whatever its value (dim=4 was once read as format 2)
    assert RBEConfig(dim=4).format_version == RBEConfig(dim=6).format_version == 1
    assert RBEConfig(idx=10).format_version == RBEConfig(residual="int8").format_version == 1
    assert RBEConfig(codec="seed64").format_version == 1
    v1 = RBEConfig(format_version=1)  # format 1 with no fields: the rbe-5.5 preset
    assert v1.base_spec() == RBEConfig.from_preset("rbe-5.5").base_spec()


@pytest.mark.parametrize("kw,match", [
    (dict(format_version=1, planes=["e8p"]), r"\['planes'\] is not a setting of format 1"),
    (dict(planes=["e8p"], dim=4), r"\['planes'\] is not a setting of format 1"),
    (dict(format_version=2, idx=7), r"\['idx'\] is not a setting of format 2.*format_version=1"),
    (dict(format_version=2, tile=7), r"\['tile'\] is not a setting of format 2.*codec='seed64'"),
    (dict(codec="seed64", dim=3), r"\['dim'\] is not a setting of codec='seed64'"),
    (dict(codec="seed64", group_size=32), r"\['group_size'\] is not a setting of codec='seed64'"),
])
def test_a_setting_of_another_format_is_refused(kw, match):
    with pytest.raises(ConfigError, match=match):
        RBEConfig(**kw)


@pytest.mark.parametrize("kw", [dict(idx=7), dict(residual="int8"), dict(dim=3), dict(tile=7), dict(seed64_scale=False)])
def test_presets_refuse_settings_they_would_ignore(kw):
    with pytest.raises(ConfigError, match="is not a setting of format 2"):
        RBEConfig.from_preset("v2-3", **kw)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_and_round_trips(name):
    c = RBEConfig.from_preset(name)
    again = RBEConfig.from_dict(c.to_dict())
    assert again.to_dict() == c.to_dict() and again.base_spec() == c.base_spec()


# ----------------------------------------------------------------------------- invalid settings


@pytest.mark.parametrize("kw,match", [
    (dict(idx=40), "field 'idx'"),
    (dict(bitz=2), "unknown RBEConfig arguments"),
    (dict(residual="int8", residual_stage={"dim": 4, "idx": 7}), "residual_stage"),
    (dict(residual="rbe", residual_stage={}), "residual_stage"),
    (dict(format_version=1, overrides={"*": {"colour": 1}}), r"keys \['colour'\] that format v1 layers do not have"),
    (dict(planes=["e8p"], overrides={"*": {"idx": 7}}), r"keys \['idx'\] that format v2 layers do not have"),
    (dict(format_version=99), "upgrade"),
    (dict(format_version=0), "format_version"),
    (dict(format_version=-7), "format_version"),
    (dict(format_version="1"), "format_version must be a positive int"),
    (dict(format_version=2, codec="seed64"), "format 1"),
    (dict(dim=True), "dim"),
    (dict(group_size=8.0, planes=["e8p"]), "group_size"),
    (dict(modules_to_not_convert="lm_head"), r"list of module names.*\['lm_head'\]"),
    (dict(modules_to_not_convert=["(["]), "not a valid regular expression"),
    (dict(modules_to_not_convert=[3]), "module names or patterns"),
    (dict(overrides={"*q_proj": {"rotation": "no"}}), "rotation must be a bool"),
    (dict(overrides=["*q_proj"]), "overrides must map glob patterns"),
    (dict(overrides={"*": "e8p"}), "overrides must map glob patterns"),
    (dict(rotation_seed=-1), "rotation_seed"),
    (dict(calibration_samples=True), "calibration_samples"),
    (dict(calibration_seed=2**70), "calibration_seed"),
    (dict(calibration_e2e_lr=float("inf")), "calibration_e2e_lr must be a finite number"),
    (dict(calibration_finetune_lr=0), "calibration_finetune_lr"),
    (dict(calibration_fisher="yes"), "calibration_fisher must be a bool or None"),
    (dict(damp_percent=1.5), "damp_percent must be in"),
    (dict(dataset=[]), "non-empty list of strings"),
    (dict(dataset=42), "dataset must be"),
    (dict(quantize_embeddings="yes"), "quantize_embeddings"),
    (dict(qat_train_quantizer=True), "needs qat=True"),
    (dict(embedding_dtype="int8"), "embedding_dtype"),
    (dict(prefill_dtype="float16"), "prefill_dtype must be None or one of"),
    (dict(table="shared"), "table must be"),
    (dict(codec="jpeg"), "codec"),
    (dict(codec="seed64", residual="int8"), "residual"),
    (dict(codec="seed64", tile=24), "tile"),
    (dict(codec="seed64", qat=True), "qat=True is not available with codec='seed64'"),
    (dict(codec="seed64", quantize_embeddings=True), "codec='rbe'"),
    (dict(codec="seed64", dataset=["some text"]), "codec='seed64' takes no dataset"),
    (dict(planes=["e8p"], target_bits=float("nan")), "target_bits must be a finite number"),
    (dict(planes=["e8p"], target_bits=0), "target_bits must be a finite number"),
    (dict(format_version=1, target_bits=3.5), "format-2 code planes"),
    (dict(planes=["e8p"], table="per_layer", target_bits=3.5), "universal"),
])
def test_invalid_settings_fail_in_the_constructor(kw, match):
    with pytest.raises(ConfigError, match=match):
        RBEConfig(**kw)


def test_off_ladder_planes_with_target_bits_fail_in_the_constructor():
    # before any Fisher pass or weight is touched (they used to fail only after the Fisher pass)
    with pytest.raises(ConfigError, match="ladder"):
        RBEConfig(planes=["e8p", "vq8", "vq8"], target_bits=6.0)
    with pytest.raises(ConfigError, match="override '\\*.down_proj'"):
        RBEConfig.from_preset("v2-3", target_bits=3.5, overrides={"*.down_proj": {"planes": ["e8p", "vq4", "vq4"]}})
    RBEConfig.from_preset("v2-3", target_bits=3.5, overrides={"*.down_proj": {"planes": ["e8p", "e8p"]}})


def test_target_bits_needs_a_dataset_to_quantize():
    c = RBEConfig.from_preset("v2-2", target_bits=3.5)  # a saved config reloads without one
    with pytest.raises(ConfigError, match="give a dataset"):
        c.check_quantizable()


# ----------------------------------------------------------------------------- saving


def test_a_saved_config_holds_what_its_format_uses():
    v2 = RBEConfig.from_preset("v2-3", dataset=["some text"], calibration_samples=8, embedding_dtype="bfloat16").to_dict()
    assert v2["planes"] == ["e8p", "vq8"] and v2["format_version"] == 2 and v2["embedding_dtype"] == "bfloat16"
    assert not {"dim", "idx", "residual", "residual_stage", "tile", "seed64_scale"} & set(v2)
    assert not {"dataset", "tokenizer", "calibration_samples", "target_bits"} & set(v2)  # how, not what
    v1 = RBEConfig.from_preset("rbe-3").to_dict()
    assert v1["idx"] == 9 and "planes" not in v1 and "tile" not in v1
    s64 = RBEConfig(codec="seed64").to_dict()
    assert s64["tile"] == 32 and "idx" not in s64 and "group_size" not in s64


def test_configs_saved_by_older_hf_rbe_load():
    # every field was written whatever the format, format-1 defaults inside format-2 configs included
    old_v2 = {"amp": 2, "amp_fine": 0, "calibrated_with": None, "calibration_batch_size": 2, "calibration_e2e_lr": 0.0003,
              "calibration_e2e_steps": None, "calibration_finetune_lr": 0.001, "calibration_finetune_steps": None,
              "calibration_fisher": None, "calibration_samples": 64, "calibration_seed": 0, "calibration_seqlen": 512,
              "cat": 0, "codec": "rbe", "damp_percent": None, "dataset": None, "deriv": 0, "dim": 4,
              "embedding_dtype": None, "format_version": 2, "group_size": 32, "idx": 9,
              "keep_calibration_statistics": False, "modules_to_not_convert": None, "overrides": {},
              "planes": ["e8p", "vq4"], "qat": False, "qat_train_quantizer": False, "quant_method": "rbe",
              "quantize_embeddings": True, "residual": "none", "residual_group_size": 64, "residual_stage": None,
              "rotation": True, "rotation_block": 256, "rotation_seed": 0, "seed64_scale": True, "sign": 1, "sub": 0,
              "table": "universal", "table_seed": 0, "target_bits": None, "tile": 32, "tokenizer": None}
    c = RBEConfig.from_dict(old_v2)
    assert c.base_spec() == RBEConfig.from_preset("v2-2.5", group_size=32).base_spec() and c.quantize_embeddings
    edited = {**old_v2, "idx": 7}  # not a value older hf-rbe wrote: a hand edit that would be ignored
    with pytest.raises(ConfigError, match="idx"):
        RBEConfig.from_dict(edited)


# ----------------------------------------------------------------------------- copies


def test_copies_are_independent_and_share_the_calibration_data():
    data = ["some calibration text"] * 3
    c = RBEConfig.from_preset("v2-3", dataset=data, overrides={"*.q_proj": {"planes": ["e8p", "e8p"]}})
    d = c.copy()
    d.overrides["*.k_proj"] = {"planes": ["e8p"]}
    d.overrides["*.q_proj"]["planes"].append("vq4")
    assert c.overrides == {"*.q_proj": {"planes": ["e8p", "e8p"]}}
    assert d.dataset is data
    e = c.with_calibration({"layers.0.mlp.up_proj": {"planes": ["e8p", "e8p"]}}, {"dataset": "3 texts"})
    assert "layers.0.mlp.up_proj" in e.overrides and c.calibrated_with is None and e.calibrated_with == {"dataset": "3 texts"}
    assert copy.deepcopy(c).to_dict() == c.to_dict()
