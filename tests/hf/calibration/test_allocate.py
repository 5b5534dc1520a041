"""Bit allocation (``target_bits``) and the Fisher pass behind it and behind the weighted Hessians."""

import json

import pytest
import torch
from conftest import CharTokenizer, assert_fresh_reload_identical
from conftest import calibration_config as _cfg
from conftest import structured_model as _structured_model
from torch import nn
from transformers import AutoModelForCausalLM

from hf_rbe import RBEConfig, quantize_model
from hf_rbe.core.format_v2 import PLANE_LADDER as LADDER
from hf_rbe.core.packed import packed_size
from hf_rbe.hf.calibration.allocate import allocate, relative_error
from hf_rbe.hf.calibration.capture import Hessians, find_blocks
from hf_rbe.hf.calibration.fisher import fisher
from hf_rbe.hf.calibration.windows import calibration_ids
from hf_rbe.hf.replace import eligible


def _layers(n: int = 3) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {f"l{i}": nn.Linear(512, 256) for i in range(n)}


def _stored_bits(cfg: RBEConfig, layers: dict[str, nn.Module], planes: dict[str, tuple[str, ...]]) -> float:
    """Bits per weight of an allocation, counted independently of ``allocate``: every stored
    tensor of each layer plus each distinct stack's tables once."""
    from hf_rbe.core.format_v2 import LayerSpecV2, StageV2

    bits, stacks = 0, set()
    for name, m in layers.items():
        spec = LayerSpecV2(tuple(StageV2(p) for p in planes[name]))
        bits += sum(torch.Size(t.shape).numel() * t.dtype.itemsize * 8 for t in spec.tensors(256, 512).values())
        stacks.add(planes[name])
    for stack in stacks:
        spec = LayerSpecV2(tuple(StageV2(p) for p in stack))
        bits += sum(torch.Size(t.shape).numel() * t.dtype.itemsize * 8 for t in spec.table_tensors().values())
    return bits / sum(m.weight.numel() for m in layers.values())


def test_the_ladder_gives_less_per_bit_at_each_step():
    """``allocate`` buys rungs in order; that is greedy-optimal only with diminishing returns."""
    errors = [relative_error(p) for p in LADDER]
    bits = [sum({"e8p": 2, "vq8": 1, "vq4": 0.5}[x] for x in p) for p in LADDER]
    slopes = [(errors[i] - errors[i + 1]) / (bits[i + 1] - bits[i]) for i in range(len(LADDER) - 1)]
    assert all(e > 0 for e in errors) and errors == sorted(errors, reverse=True)
    assert slopes == sorted(slopes, reverse=True), slopes


def test_allocation_gives_the_planes_to_sensitive_layers_within_the_budget():
    cfg, layers = RBEConfig.from_preset("v2-2"), _layers()
    planes = allocate(cfg, layers, {"l0": 100.0, "l1": 10.0, "l2": 1.0}, 3.5)
    rungs = [LADDER.index(planes[n]) for n in layers]
    assert rungs[0] >= rungs[1] >= rungs[2] and rungs[0] > rungs[2], planes
    used = _stored_bits(cfg, layers, planes)
    assert 3.0 < used <= 3.5, used  # the budget is spent, not exceeded


def test_allocation_starts_from_the_configured_planes():
    cfg, layers = RBEConfig.from_preset("v2-4"), _layers()
    planes = allocate(cfg, layers, {"l0": 1.0, "l1": 0.0, "l2": 0.0}, 6.0)
    assert planes["l1"] == planes["l2"] == ("e8p", "e8p")  # no gain: kept at the floor, never below
    assert LADDER.index(planes["l0"]) > LADDER.index(("e8p", "e8p"))


def test_impossible_budgets_are_refused():
    with pytest.raises(ValueError, match="below what the configured planes store"):
        allocate(RBEConfig.from_preset("v2-4"), _layers(), dict.fromkeys(("l0", "l1", "l2"), 1.0), 3.0)
    with pytest.raises(ValueError, match="allocation ladder"):
        allocate(RBEConfig(planes=["e8p", "vq8", "vq8"]), _layers(), dict.fromkeys(("l0", "l1", "l2"), 1.0), 6.0)
    with pytest.raises(ValueError, match="give a dataset"):
        quantize_model(_structured_model(), RBEConfig.from_preset("v2-2", target_bits=3.5))


def test_fisher_weights_every_block_token_and_leaves_the_model_as_it_was():
    model = _structured_model()
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    batches = list(calibration_ids(_cfg(), CharTokenizer(), 128).split(4))
    layers = dict(eligible(model, ["lm_head"]))
    out = fisher(model, layers, batches)
    assert set(out.weights) == set(layers) and all(s > 0 for s in out.sensitivity.values())
    for w in out.weights.values():
        assert [x.shape for x in w] == [b.shape for b in batches]
        assert torch.cat([x.flatten() for x in w]).mean().item() == pytest.approx(1.0)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert all(p.grad is None for p in model.parameters())


def test_weighted_hessians_count_each_token_by_its_weight():
    layer = nn.Linear(16, 4)
    x = torch.randn(2, 5, 16)
    w = torch.rand(2, 5)
    with Hessians({"l": layer}, {"l": [w]}) as watch:
        layer(x)
    h = watch.sums()["l"]
    assert not layer._forward_hooks  # the hooks come off
    flat = x.reshape(-1, 16)
    assert torch.allclose(h, flat.T @ (flat * w.reshape(-1, 1)), atol=1e-5)


def test_allocated_model_fits_its_budget_and_reloads_bit_identical(tmp_path):
    uniform = packed_size(quantize_model(_structured_model(), _cfg()))["bits_per_weight"]
    target = uniform + 3.0  # a tiny model: each new stack's tables cost it 2-3 bits per weight
    m = quantize_model(_structured_model(), _cfg(target_bits=target))
    got = packed_size(m)["bits_per_weight"]
    assert uniform + 0.5 < got <= target, (uniform, got, target)
    prefix = find_blocks(m)[0]
    overrides = m.config.quantization_config.overrides
    assert {json.dumps(v["planes"]) for k, v in overrides.items() if k.startswith(prefix)} != {'["e8p"]'}
    assert m.config.quantization_config.calibrated_with["target_bits"] == target
    ids = torch.tensor([[1, 5, 9, 33, 70, 2]])
    with torch.no_grad():
        logits = m(ids).logits
    m.save_pretrained(tmp_path / "out")
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").config.quantization_config.overrides == overrides
    assert_fresh_reload_identical(tmp_path / "out", ids, logits)


def test_windows_carry_the_tokenizers_special_tokens():
    class Framing(CharTokenizer):
        def __call__(self, text, return_tensors="pt", add_special_tokens=True):
            ids = super().__call__(text).input_ids
            if add_special_tokens:
                ids = torch.cat([torch.tensor([[1]]), ids, torch.tensor([[2]])], 1)
            return type(super().__call__(""))(input_ids=ids)

    w = calibration_ids(_cfg(), Framing(), 128)
    assert w.shape == (8, 32) and (w[:, 0] == 1).all() and (w[:, -1] == 2).all()
    with pytest.raises(ValueError, match="leaves no room for text"):
        calibration_ids(_cfg(calibration_seqlen=2), Framing(), 128)


def test_encoders_get_fisher_weighting_and_its_damping_by_default():
    from transformers import BertConfig, BertModel

    def bert() -> BertModel:
        torch.manual_seed(0)
        return BertModel(BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                    intermediate_size=128)).eval()

    record = quantize_model(bert(), _cfg()).config.quantization_config.calibrated_with
    assert record["fisher"] is True and record["damp_percent"] == 0.2
    record = quantize_model(bert(), _cfg(damp_percent=0.05, calibration_fisher=False)).config \
        .quantization_config.calibrated_with
    assert record["fisher"] is False and record["damp_percent"] == 0.05
