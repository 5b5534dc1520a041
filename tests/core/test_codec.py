
import pytest
import torch
from conftest import rel_mse

from hf_rbe.core.codec import decode_layer, encode_layer, rotate_weight
from hf_rbe.core.format import CodeLayout, LayerSpec, ResidualSpec, StageSpec
from hf_rbe.core.rotation import random_signs, rotate, unrotate
from hf_rbe.core.spec import FormatError
from hf_rbe.core.tables import derivative, tables_for, universal_tables
from hf_rbe.hf.config import PRESETS, RBEConfig


def test_rotation_is_orthogonal_and_preserves_products():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(5, 96, generator=g, dtype=torch.float64), torch.randn(7, 96, generator=g, dtype=torch.float64)
    s = random_signs(1234, 96).double()
    assert torch.allclose(unrotate(rotate(x, s, 32), s, 32), x, atol=1e-12)
    assert torch.allclose(rotate(x, s, 32) @ rotate(w, s, 32).T, x @ w.T, atol=1e-10)
    assert not torch.equal(random_signs(1, 64), random_signs(2, 64))


def test_table_rows_are_unit_and_deterministic():
    stage = StageSpec(dim=4, layout=CodeLayout(idx=5, sign=1, amp=2))
    t1 = universal_tables(stage).table
    from hf_rbe.core.tables import basis_table

    t2 = basis_table(4, 5, True, 0)
    assert t1.shape == (32, 4) and torch.equal(t1, t2)
    assert torch.allclose(t1.norm(dim=1), torch.ones(32), atol=1e-5)


def test_derivative_map_cycles_like_sin_cos():
    v = torch.randn(3, 8, dtype=torch.float64)
    assert torch.allclose(derivative(derivative(v)), -v)
    assert torch.allclose((derivative(v) * v).sum(-1), torch.zeros(3, dtype=torch.float64), atol=1e-12)


def _gauss(n=192, k=384, seed=0):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("preset", ["rbe-2", "rbe-2.5"])
def test_within_3db_of_shannon_bound_on_gaussian(preset):
    """The acceptance criterion of the format: relMSE <= 2 * 2^(-2R), R counting scales."""
    spec = RBEConfig.from_preset(preset).base_spec()
    w = _gauss()
    enc = encode_layer(w, spec, tables_for(spec), rotation_seed=7)
    err = rel_mse(decode_layer(enc, spec, tables_for(spec), w.shape[1]), rotate_weight(w, spec, 7))
    bits = spec.bits_per_weight_estimate(w.shape[1])
    assert err <= 2 * 2 ** (-2 * bits), (err, bits)


def test_error_falls_with_bits_and_every_residual_helps():
    w = _gauss(64, 192, 1)
    errs = {}
    for name in (p for p in PRESETS if p.startswith("rbe-")):  # format v1 presets
        spec = RBEConfig.from_preset(name).base_spec()
        enc = encode_layer(w, spec, tables_for(spec), 3)
        errs[name] = rel_mse(decode_layer(enc, spec, tables_for(spec), 192), rotate_weight(w, spec, 3))
    order = ["rbe-1.5", "rbe-2", "rbe-2.5", "rbe-3"]
    assert all(errs[a] > errs[b] for a, b in zip(order, order[1:])), errs
    base = LayerSpec(stage=StageSpec(dim=4, layout=CodeLayout(idx=4, sign=1, amp=1)))
    enc = encode_layer(w, base, tables_for(base), 3)
    e0 = rel_mse(decode_layer(enc, base, tables_for(base), 192), rotate_weight(w, base, 3))
    for kind in ["int2", "int4", "int8", "fp8"]:
        spec = LayerSpec(stage=base.stage, residual=ResidualSpec(kind=kind, group_size=64))
        enc = encode_layer(w, spec, tables_for(spec), 3)
        e = rel_mse(decode_layer(enc, spec, tables_for(spec), 192), rotate_weight(w, spec, 3))
        assert e < e0 / 3, (kind, e, e0)


def test_every_field_is_exercised_and_decodes_consistently():
    """cat/sub/deriv/amp_fine all on: the encoder uses them and decode inverts the packing."""
    lay = CodeLayout(idx=5, sign=1, amp=2, deriv=1, cat=2, sub=1, amp_fine=1)
    spec = LayerSpec(stage=StageSpec(dim=4, layout=lay, group_size=32))
    w = _gauss(32, 128, 2)
    enc = encode_layer(w, spec, tables_for(spec), 0)
    from hf_rbe.core.bits import unpack_codes

    fields = lay.unpack_fields(unpack_codes(enc["weight"], lay.width, 32))
    for f in ("deriv", "cat", "sub", "amp_fine", "sign"):
        assert fields[f].unique().numel() == 2 ** getattr(lay, f), f
    err = rel_mse(decode_layer(enc, spec, tables_for(spec), 128), rotate_weight(w, spec, 0))
    assert err < 0.12


def test_encoding_is_deterministic():
    spec = RBEConfig(format_version=1).base_spec()
    w = _gauss(16, 64)
    a, b = encode_layer(w, spec, tables_for(spec), 5), encode_layer(w, spec, tables_for(spec), 5)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_weights_raise_clearly():
    spec = RBEConfig(format_version=1).base_spec()
    w = _gauss(8, 64)
    w[3, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf"):
        encode_layer(w, spec, tables_for(spec))
    with pytest.raises(FormatError, match="fp16"):
        encode_layer(_gauss(8, 64) * 1e6, spec, tables_for(spec))
    with pytest.raises(FormatError, match="multiple"):
        encode_layer(_gauss(8, 66), spec, tables_for(spec))
