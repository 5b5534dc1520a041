"""Code steps (``calibration_code_steps``): codes re-chosen along the block loss's gradient never raise the loss
they measure, leave the codes bit-identical when no step helps, and give a model that saves, reloads, merges LoRA
adapters and freezes QAT like any other."""

import pytest
import torch
from conftest import assert_fresh_reload_identical
from conftest import calibration_config as _cfg
from conftest import structured_model as _structured_model

from hf_rbe import RBELinear, quantize_model
from hf_rbe.core.ldlq import reencode_stages, upper_inverse_cholesky
from hf_rbe.hf.calibration import codes
from hf_rbe.hf.calibration.capture import Hessians, first_block_inputs, run_block
from hf_rbe.hf.calibration.codes import block_code_step, block_loss

PLANES = [["e8p"], ["e8p", "vq4"], ["e8p", "vq8"], ["b1", "b1", "b1"]]


def _block_setup(planes):  # type: ignore[no-untyped-def]
    """Block 0 of a calibrated tiny model, its quantized-path calls, the float block's outputs and its Hessians."""
    ref, model = _structured_model(), quantize_model(_structured_model(), _cfg(planes=planes,
                                                                               calibration_finetune_steps=4))
    batches = list((torch.arange(64).reshape(4, 16) * 7 % 128).split(2))
    block, float_block = model.model.layers[0], ref.model.layers[0]
    calls = first_block_inputs(model, block, batches)
    with torch.no_grad():
        targets = [run_block(float_block, c) for c in calls]
    layers = {n: m for n, m in block.named_modules() if isinstance(m, RBELinear)}
    with Hessians(layers) as watch, torch.no_grad():
        for c in calls:
            run_block(block, c)
    return block, layers, watch.sums(), calls, targets


def _codes(layers):  # type: ignore[no-untyped-def]
    return {f"{n}.{t}": getattr(m, t).detach().clone() for n, m in layers.items()
            for t in m.spec.tensors(0, 0) if t.endswith("weight")}


@pytest.mark.parametrize("planes", PLANES)
def test_reencoding_the_weight_the_codes_decode_to_gives_them_back(planes):
    # calibrated scales can be negative (the least-squares refit): the re-encode must keep their sign
    _, layers, hessians, _, _ = _block_setup(planes)
    for name, layer in layers.items():
        stages = layer.codec.stage_quantizers(layer.spec, layer.tables())
        scales = [getattr(layer, q.prefix + "scale").detach() for q in stages]
        zeros = {q.prefix + "scale": torch.zeros_like(s) for q, s in zip(stages, scales)}
        units = [layer.decode_rotated({**zeros, q.prefix + "scale": torch.ones_like(s)}) for q, s in zip(stages, scales)]
        u = upper_inverse_cholesky(layer.rotated_hessian(hessians[name], 0.01))
        got, _ = reencode_stages(layer.decode_rotated(), u, stages, units, scales)
        for q, c in zip(stages, got):
            assert torch.equal(q.pack(c), getattr(layer, q.prefix + "weight")), (name, q.prefix)


@pytest.mark.parametrize("planes", PLANES)
def test_a_code_step_never_raises_the_loss_it_measures(planes):
    block, layers, hessians, calls, targets = _block_setup(planes)
    before = block_loss(block, calls, targets)
    start = _codes(layers)
    step = block_code_step(block, layers, hessians, calls, targets, 0.01)
    assert step.before == pytest.approx(before, rel=1e-6)
    assert step.after <= step.before
    assert block_loss(block, calls, targets) == pytest.approx(step.after, rel=1e-6)  # what it reports is what it left
    moved = _codes(layers)
    if step.kappa is None:
        assert step.changed == 0 and all(torch.equal(start[k], moved[k]) for k in start)
    else:
        assert step.changed > 0 and step.after < step.before


def test_a_code_step_measures_with_the_reference_op_not_a_kernel(monkeypatch):
    from hf_rbe.kernels import cpu_numba

    block, layers, hessians, calls, targets = _block_setup(["e8p", "vq4"])
    seen = []
    real = cpu_numba.linear
    monkeypatch.setattr(cpu_numba, "linear", lambda *a: seen.append(1) or real(*a))
    block_loss(block, calls, targets)
    assert seen, "outside a code step the block computes with the CPU kernel"
    seen.clear()
    block_code_step(block, layers, hessians, calls, targets, 0.01)
    assert not seen, "a code step's losses must come from the reference op"


def test_a_code_step_that_finds_nothing_better_changes_nothing(monkeypatch):
    monkeypatch.setattr(codes, "STEP_SIZES", (400.0,))  # a move this far can only be worse
    block, layers, hessians, calls, targets = _block_setup(["e8p", "vq4"])
    start, scales = _codes(layers), {n: m.scale.detach().clone() for n, m in layers.items()}
    step = block_code_step(block, layers, hessians, calls, targets, 0.01)
    assert step.kappa is None and step.changed == 0 and step.after == step.before
    assert all(torch.equal(start[k], v) for k, v in _codes(layers).items())
    assert all(torch.equal(scales[n], m.scale) for n, m in layers.items())


def test_a_code_step_that_helps_keeps_its_codes():
    # codes knocked off their LDLQ choice in one layer: moving them back along the gradient lowers the loss
    block, layers, hessians, calls, targets = _block_setup(["e8p", "vq4"])
    layer = layers["mlp.down_proj"]
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        w = layer.residual_weight
        w.copy_(torch.randint(0, 256, w.shape, generator=g, dtype=torch.int64).to(w.dtype))
    step = block_code_step(block, layers, hessians, calls, targets, 0.01)
    assert step.kappa is not None and step.changed > 0 and step.after < step.before, step


def test_calibration_with_code_steps_records_them_and_reloads_bit_identically(tmp_path):
    model = quantize_model(_structured_model(), _cfg(calibration_finetune_steps=4, calibration_code_steps=1))
    assert model.config.quantization_config.calibrated_with["code_steps"] == 1
    ids = torch.tensor([[1, 5, 9, 33, 70, 2]])
    with torch.no_grad():
        logits = model(ids).logits
    model.save_pretrained(tmp_path)
    assert_fresh_reload_identical(tmp_path, ids, logits)


def test_lora_merge_and_qat_freeze_work_on_a_code_stepped_model(tmp_path):
    peft = pytest.importorskip("peft")
    from hf_rbe.training import freeze, merge_and_unload, prepare_qat

    cfg = _cfg(calibration_finetune_steps=4, calibration_code_steps=1, keep_calibration_statistics=True)
    ids = torch.tensor([[1, 5, 9, 33, 70, 2]])
    lora = peft.get_peft_model(quantize_model(_structured_model(), cfg),
                               peft.LoraConfig(r=4, target_modules=["down_proj"], lora_dropout=0.0))
    with torch.no_grad():
        base = lora(ids).logits  # lora_B starts at zero
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
        adapted = lora(ids).logits
    merged = merge_and_unload(lora)
    assert isinstance(merged.model.layers[0].mlp.down_proj, RBELinear)
    with torch.no_grad():
        out = merged(ids).logits
    assert (out - adapted).pow(2).mean() < (base - adapted).pow(2).mean()  # the merge carries the adapter

    qat = quantize_model(_structured_model(), cfg)
    prepare_qat(qat, latent_from=_structured_model())
    freeze(qat)
    with torch.no_grad():
        frozen = qat(ids).logits
    assert torch.isfinite(frozen).all() and not torch.equal(frozen, adapted)
    qat.save_pretrained(tmp_path)
    assert_fresh_reload_identical(tmp_path, ids, frozen)


def test_a_code_step_on_the_end_to_end_loss_never_raises_it():
    from hf_rbe.hf.calibration.capture import features
    from hf_rbe.hf.calibration.codes import model_code_step

    ref = _structured_model()
    model = quantize_model(_structured_model(), _cfg(keep_calibration_statistics=True))
    windows = list((torch.arange(64).reshape(4, 16) * 5 % 128).split(1))
    with torch.no_grad():
        teacher = [features(ref, w) for w in windows]
    layers = {n: m for n, m in model.named_modules() if isinstance(m, RBELinear)}
    hessians = {n: m.calibration_hessian.float() for n, m in layers.items()}
    layer = layers["model.layers.1.mlp.down_proj"]
    with torch.no_grad():  # knocked off its codes, so that there is something to win back
        layer.weight.copy_(torch.randint(-2**15, 2**15, layer.weight.shape, generator=torch.Generator().manual_seed(0),
                                         dtype=torch.int64).to(layer.weight.dtype))
    start = _codes(layers)
    step = model_code_step(model, layers, hessians, windows, teacher, 0.01, ref.get_output_embeddings())
    assert step.kappa is not None and step.after < step.before, step
    assert not all(torch.equal(start[k], v) for k, v in _codes(layers).items())
