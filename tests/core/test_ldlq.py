"""Output-aware encoding (LDLQ + H-weighted scales): identity H changes nothing, correlated inputs
gain, the scale refit is the exact minimiser, the Hessian rotates with the weight."""

import pytest
import torch

from hf_rbe import RBEConfig
from hf_rbe.core import RBELinear, universal_tables
from hf_rbe.core.ldlq import proxy_error, refit_scale, rotate_hessian
from hf_rbe.core.rotation import random_signs, rotate


def _layer(preset: str, k: int = 256, n: int = 48) -> tuple[torch.nn.Linear, RBELinear]:
    torch.manual_seed(0)
    lin = torch.nn.Linear(k, n)
    spec = RBEConfig.from_preset(preset).base_spec()
    return lin, RBELinear.from_linear(lin, spec, universal_tables(spec), rotation_seed=3)


@pytest.mark.parametrize("preset", ["v2-2", "v2-2.5", "v2-3", "v2-4", "v2-b3", "rbe-2.5", "rbe-3"])
def test_identity_hessian_reproduces_the_calibration_free_codes(preset):
    lin, layer = _layer(preset)
    w = lin.weight.detach()
    plain, ident = layer.encode(w), layer.encode(w, hessian=torch.eye(w.shape[1]) * 7.0)
    codes = [k for k in plain if k.endswith("weight")]
    assert codes and all(torch.equal(plain[k], ident[k]) for k in codes)


def _correlated(k: int, tokens: int = 4096, rank: int = 12, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, rank, generator=g) @ torch.randn(rank, k, generator=g) + \
        0.05 * torch.randn(tokens, k, generator=g)


@pytest.mark.parametrize("preset", ["v2-2", "v2-3", "v2-b3", "rbe-3"])
def test_ldlq_beats_plain_encoding_on_output_error_with_correlated_inputs(preset):
    lin, layer = _layer(preset)
    w = lin.weight.detach()
    x = _correlated(w.shape[1])
    h = x.T @ x

    def output_error(tensors: dict) -> float:
        layer.load_packed(tensors)
        return proxy_error(w, layer.dequantize(), h)

    plain, cal = output_error(layer.encode(w)), output_error(layer.encode(w, hessian=h))
    assert cal < 0.5 * plain, (plain, cal)


@pytest.mark.parametrize("groups", [1, 4])
def test_scale_refit_is_the_exact_minimiser(groups):
    g = torch.Generator().manual_seed(2)
    w, c = torch.randn(5, 32, generator=g), torch.randn(5, 32, generator=g)
    x = torch.randn(200, 32, generator=g)
    h = x.T @ x
    s = refit_scale(w, c, h, groups)
    expand = lambda s: s.repeat_interleave(32 // groups, dim=1)  # noqa: E731
    loss = lambda s: float((((w - expand(s) * c) @ h) * (w - expand(s) * c)).sum())  # noqa: E731
    best = loss(s)
    for _ in range(20):  # no nearby scale does better
        assert loss(s + 1e-3 * torch.randn(s.shape, generator=g)) >= best - 1e-6


def test_the_hessian_rotates_with_the_weight():
    g = torch.Generator().manual_seed(4)
    x, w = torch.randn(64, 32, generator=g, dtype=torch.float64), torch.randn(8, 32, generator=g, dtype=torch.float64)
    signs = random_signs(11, 32).double()
    xr, wr = rotate(x, signs, 16), rotate(w, signs, 16)
    h_rot = rotate_hessian(x.T @ x, 11, 16)
    assert torch.allclose(h_rot, xr.T @ xr, atol=1e-9)
    e = 0.1 * torch.randn(8, 32, generator=g, dtype=torch.float64)  # the same output error in both bases
    assert torch.allclose(((e @ (x.T @ x)) * e).sum(), ((rotate(e, signs, 16) @ h_rot) * rotate(e, signs, 16)).sum())
    assert torch.allclose(x @ w.T, xr @ wr.T)


def test_the_inverse_cholesky_factor_is_upper_and_inverts_h():
    from hf_rbe.core.ldlq import damped, upper_inverse_cholesky

    torch.manual_seed(0)
    x = torch.randn(40, 24, dtype=torch.float64)
    h = damped(x.T @ x)  # rank 24 of 24 plus damping
    u = upper_inverse_cholesky(h)
    assert u.dtype == torch.float32 and torch.equal(u, u.triu())
    assert torch.allclose(u.double().T @ u.double(), torch.linalg.inv(h), rtol=1e-4, atol=1e-6)
    before = h.clone()
    upper_inverse_cholesky(h)
    assert torch.equal(h, before)  # works on its own copy
