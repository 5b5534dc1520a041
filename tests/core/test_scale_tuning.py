"""Scale tuning: the fine-tunes train every stage's scales with the codes fixed, through gradients
computed from the codewords instead of autograd through the decoder."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hf_rbe import RBEConfig, RBELinear
from hf_rbe.core.errors import EncodingError
from hf_rbe.core.rbe_codecs import universal_tables
from hf_rbe.core.scale_tuning import scale_names, tuned_scales


def _layer(preset: str, **kw) -> RBELinear:
    torch.manual_seed(0)
    spec = RBEConfig.from_preset(preset, **kw).base_spec()
    return RBELinear.from_linear(nn.Linear(64, 24), spec, universal_tables(spec), rotation_seed=5)


@pytest.mark.parametrize("preset,kw", [("v2-3", {}), ("v2-2.5", {"group_size": 32}), ("rbe-5", {}),
                                       ("rbe-4.5", {"group_size": 16})])
def test_gradients_equal_autograd_through_the_decoder(preset, kw):
    layer = _layer(preset, **kw)
    x = torch.randn(3, 5, 64, requires_grad=True)
    ref = {n: getattr(layer, n).detach().float().clone().requires_grad_() for n in scale_names(layer)}
    y_ref = F.linear(x, layer.dequantize(torch.float32, ref), layer.bias)
    g = torch.randn_like(y_ref)
    (y_ref * g).sum().backward()
    gx = x.grad.clone()
    x.grad = None
    with tuned_scales(layer) as params:
        y = layer(x)
        (y * g).sum().backward()
    assert torch.equal(y, y_ref) and torch.allclose(x.grad, gx, rtol=0, atol=1e-6)
    for p, name in zip(params, ref):
        assert torch.allclose(p.grad, ref[name].grad, rtol=1e-5, atol=1e-6 * ref[name].grad.abs().max()), name


def test_trained_scales_are_written_back_and_nothing_else_changes():
    layer = _layer("v2-3")
    codes = {n: t.clone() for n, t in layer.state_dict().items() if not n.endswith("scale")}
    with tuned_scales(layer) as params:
        with torch.no_grad():
            for p in params:
                p.mul_(1.25)
    assert layer.tuned_scales is None
    assert all(torch.equal(layer.state_dict()[n], t) for n, t in codes.items())
    assert torch.equal(layer.scale, (params[0] * 1).half())


def test_an_error_inside_leaves_the_scales_and_divergence_is_refused():
    layer = _layer("v2-3")
    before = layer.scale.clone()
    with pytest.raises(RuntimeError, match="interrupted"), tuned_scales(layer) as params:
        params[0].data.mul_(2)
        raise RuntimeError("interrupted")
    assert torch.equal(layer.scale, before) and layer.tuned_scales is None
    with pytest.raises(EncodingError, match="diverged"), tuned_scales(layer) as params:
        params[0].data.fill_(float("inf"))
    assert torch.equal(layer.scale, before)
