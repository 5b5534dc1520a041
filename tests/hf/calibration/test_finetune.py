"""The end-to-end fine-tune's activation memory: kept blocks compute what recomputed ones do, and the
budget decides how many are kept."""

import copy

import pytest
import torch
from conftest import CharTokenizer, peaked_llama
from conftest import calibration_config as _cfg

from hf_rbe import quantize_model
from hf_rbe.core.ops import reference_only
from hf_rbe.core.scale_tuning import tuned_scales
from hf_rbe.hf.calibration.capture import features, find_blocks, first_block_inputs
from hf_rbe.hf.calibration.finetune import activation_bytes, checkpointed, finetune_model, keep_activations
from hf_rbe.hf.calibration.windows import calibration_ids


def _setup():  # type: ignore[no-untyped-def]
    ref = peaked_llama(num_hidden_layers=4)
    windows = list(calibration_ids(_cfg(), CharTokenizer(), 128).split(1))
    with torch.no_grad():
        teacher = [features(ref, w) for w in windows]
    return quantize_model(copy.deepcopy(ref), _cfg()), windows, teacher


def _trained(model, windows, teacher, memory: int) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    finetune_model(model, windows, teacher, steps=4, lr=1e-3, activation_memory=memory)
    return {k: v for k, v in model.state_dict().items() if v.is_floating_point()}


def test_kept_activations_train_to_exactly_what_recomputed_ones_do(caplog):
    model, windows, teacher = _setup()
    before = {k: v.clone() for k, v in model.state_dict().items() if v.is_floating_point()}
    recomputed = _trained(copy.deepcopy(model), windows, teacher, 0)
    with caplog.at_level("INFO", logger="hf_rbe.hf.calibration.finetune"):
        kept = _trained(model, windows, teacher, 2**30)
    assert "activations of 4 of 4 blocks kept" in caplog.text
    assert recomputed.keys() == kept.keys() == before.keys()
    assert sum(not torch.equal(before[k], kept[k]) for k in kept if k.endswith("scale")) > 10  # it trained
    changed = [k for k in kept if not torch.equal(recomputed[k], kept[k])]
    assert changed == []


def test_the_budget_decides_how_many_blocks_keep_their_activations():
    model, windows, _ = _setup()
    blocks = find_blocks(model)[1]
    with reference_only(), tuned_scales(model) as scales, checkpointed(blocks) as wrappers:
        for s in scales:
            s.requires_grad_(True)
        per_block = activation_bytes(wrappers[0].block, first_block_inputs(model, wrappers[0], [windows[0]])[0])
        assert per_block > windows[0].numel() * model.config.hidden_size * 4  # at least the block's input, in fp32
        for budget, keep in [(0, 0), (per_block - 1, 0), (2 * per_block + per_block // 2, 2), (10**12, 4)]:
            for w in wrappers:
                w.recompute = True
            assert keep_activations(model, wrappers, windows[0], budget) == keep
            assert [w.recompute for w in wrappers] == [i >= keep for i in range(4)]
    assert all(type(b).__name__ == "LlamaDecoderLayer" for b in blocks)  # the wrappers are gone again


@pytest.mark.parametrize("value", [-1, float("nan"), float("inf"), True, "1GiB", None])
def test_a_bad_activation_budget_is_refused(value):
    from hf_rbe import RBEConfig
    from hf_rbe.core.errors import ConfigError

    with pytest.raises(ConfigError, match="calibration_e2e_memory must be a finite number of GiB >= 0"):
        RBEConfig.from_preset("v2-2", calibration_e2e_memory=value)


def test_an_encoder_keeps_its_activations_too():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    ref = BertModel(BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                               vocab_size=128)).eval()
    windows = list(calibration_ids(_cfg(), CharTokenizer(), 128).split(2))
    with torch.no_grad():
        teacher = [features(ref, w) for w in windows]
    model = quantize_model(copy.deepcopy(ref), _cfg())
    recomputed = _trained(copy.deepcopy(model), windows, teacher, 0)
    kept = _trained(model, windows, teacher, 2**30)
    assert [k for k in kept if not torch.equal(recomputed[k], kept[k])] == []
