"""Straight-through latent weights after calibration (``calibration.latent``): a re-encoding never raises the loss
it measures, unmoved latent weights and scales give the codes back, moved ones move codes, and the result saves and
reloads bit-identically."""

import pytest
import torch
from conftest import assert_fresh_reload_identical
from conftest import calibration_config as _cfg
from conftest import structured_model as _structured_model

from hf_rbe import RBELinear, quantize_model
from hf_rbe.hf.calibration.capture import features
from hf_rbe.hf.calibration.finetune import EndToEndLoss
from hf_rbe.hf.calibration.latent import latent_finetune


def _sharp():  # type: ignore[no-untyped-def]
    """The tiny model with a head a hundred times larger: its random head alone gives near-uniform
    next-token distributions, whose KL divergences sit at rounding level."""
    m = _structured_model()
    with torch.no_grad():
        m.lm_head.weight.mul_(100)
    return m


def _setup(planes=("e8p",), knock: bool = False):  # type: ignore[no-untyped-def]
    ref = _sharp()
    model = quantize_model(_sharp(), _cfg(planes=list(planes), keep_calibration_statistics=True))
    windows = list((torch.arange(64).reshape(4, 16) * 5 % 128).split(1))
    with torch.no_grad():
        teacher = [features(ref, w) for w in windows]
    layers = {n: m for n, m in model.named_modules() if isinstance(m, RBELinear)}
    hessians = {n: m.calibration_hessian.float() for n, m in layers.items()}
    if knock:  # one layer knocked off its codes, so that there is something to win back
        w = layers["model.layers.1.mlp.down_proj"].weight
        with torch.no_grad():
            w.copy_(torch.randint(-2**7, 2**7, w.shape, generator=torch.Generator().manual_seed(0)).to(w.dtype))
    return ref, model, windows, teacher, layers, hessians


def _codes(layers):  # type: ignore[no-untyped-def]
    return {f"{n}.{t}": getattr(m, t).detach().clone() for n, m in layers.items()
            for t in m.spec.tensors(0, 0) if t.endswith("weight")}


def _loss(model, windows, teacher, head):  # type: ignore[no-untyped-def]
    loss = EndToEndLoss(model, head)
    return sum(loss(w, t, backward=False) for w, t in zip(windows, teacher)) / len(windows)


def test_unmoved_latent_weights_and_scales_give_the_codes_back():
    ref, model, windows, teacher, layers, hessians = _setup(["e8p", "vq4"])
    start = _codes(layers)
    run = latent_finetune(model, layers, hessians, windows, teacher, steps=4, lr=0.0, latent_lr=0.0,
                          reencode_every=2, damp=0.01, teacher_head=ref.get_output_embeddings())
    assert [r.step for r in run.reencodings] == [2, 4] and run.changed == 0
    assert all(r.changed == 0 for r in run.reencodings)
    assert all(torch.equal(start[k], v) for k, v in _codes(layers).items())


@pytest.mark.parametrize("latent_lr", [1e-4, 1e-3])  # re-encodings kept, and refused (steps too large)
@pytest.mark.parametrize("planes", [["e8p"], ["e8p", "vq8"], ["b1", "b1", "b1"]])
def test_a_reencoding_never_raises_the_loss_it_measures(planes, latent_lr):
    # lr 0: nothing but the codes changes the loss, so each re-encoding starts where the one before left it
    ref, model, windows, teacher, layers, hessians = _setup(planes, knock=True)
    head = ref.get_output_embeddings()
    start, first = _codes(layers), _loss(model, windows, teacher, head)
    run = latent_finetune(model, layers, hessians, windows, teacher, steps=6, lr=0.0, latent_lr=latent_lr,
                          reencode_every=2, damp=0.01, teacher_head=head)
    # measured inside through the fine-tune's decode and outside through the kernel: a few ulps apart
    assert len(run.reencodings) == 3 and run.reencodings[0].before == pytest.approx(first, rel=1e-4)
    assert any(r.changed > 0 for r in run.reencodings)
    for r, after in zip(run.reencodings, run.reencodings[1:]):
        assert after.before == pytest.approx(min(r.before, r.tried), rel=1e-6)
    last = run.reencodings[-1]
    assert _loss(model, windows, teacher, head) == pytest.approx(min(last.before, last.tried), rel=1e-4)
    if not run.kept:
        assert run.changed == 0 and all(torch.equal(start[k], v) for k, v in _codes(layers).items())


def test_large_latent_steps_move_codes_and_the_result_reloads_bit_identically(tmp_path):
    ref, model, windows, teacher, layers, hessians = _setup(["e8p"], knock=True)
    head = ref.get_output_embeddings()
    before = _loss(model, windows, teacher, head)
    start = _codes(layers)
    run = latent_finetune(model, layers, hessians, windows, teacher, steps=6, lr=0.0, latent_lr=1e-4,
                          reencode_every=2, damp=0.01, teacher_head=head)
    assert run.kept and run.changed > 0 and run.reencodings[-1].before < before
    assert not all(torch.equal(start[k], v) for k, v in _codes(layers).items())
    assert _loss(model, windows, teacher, head) < before
    with torch.no_grad():
        logits = model(windows[0]).logits
    model.save_pretrained(tmp_path)
    assert_fresh_reload_identical(tmp_path, windows[0], logits)


def test_reencode_every_must_be_positive():
    ref, model, windows, teacher, layers, hessians = _setup()
    with pytest.raises(ValueError, match="reencode_every"):
        latent_finetune(model, layers, hessians, windows, teacher, 1, 0.0, 0.0, 0, 0.01)
