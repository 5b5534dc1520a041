"""seed64: the paper's bit-layout test vectors, round trips, the generator, the encoder, the layer."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_rbe.core import seed64 as S
from hf_rbe.core.seed64_format import FIELDS, MASK, OFFSET, Seed64Spec
from hf_rbe.core.seed64_linear import Seed64Linear
from hf_rbe.core.spec import FormatError


def test_layout_fills_64_bits_without_overlap():
    assert sum(w for _, w in FIELDS) == 64
    seen = 0
    for name, _ in FIELDS:
        bits = MASK[name] << OFFSET[name]
        assert seen & bits == 0, name
        seen |= bits
    assert seen == 2**64 - 1


def test_paper_test_vectors():
    s = S.unpack(0x7FFFF800000AFB6A)
    assert (s.basis, s.d_theta, s.d_r, s.rot, s.log2_c, s.reserved) == (10, 3, 1, 13, -3, 42)
    assert s.radius == pytest.approx(0.49999952, abs=1e-8)
    assert s.angle == pytest.approx(3.1415928, abs=1e-6)
    clamped = S.Seed(S.quantize_r(0.5), S.quantize_theta(math.pi), 10, 3, 1, 13, -3, 42)
    assert S.pack(clamped) == 0x80000800000AFB6A
    assert S.quantize_r(1.0) == 2**20 - 1 and S.quantize_r(-0.2) == 0


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=0, max_value=2**64 - 1))
def test_unpack_pack_round_trip(value):
    assert S.pack(S.unpack(value)) == value
    as_i64 = value - 2**64 if value >= 2**63 else value
    t = torch.tensor([as_i64], dtype=torch.int64)
    f = S.unpack_tensor(t)
    s = S.unpack(value)
    assert int(f["basis"]) == s.basis and int(f["log2_c"]) == s.log2_c and float(f["r"]) == s.radius
    ints = {**f, "r": torch.tensor([s.r]), "theta": torch.tensor([s.theta])}
    assert int(S.pack_tensor(ints)) == as_i64


def test_bad_fields_are_rejected():
    with pytest.raises(FormatError, match="log2_c"):
        S.pack(S.Seed(0, 0, 0, 0, 0, 0, 4))
    with pytest.raises(FormatError, match="basis"):
        S.pack(S.Seed(0, 0, 16, 0, 0, 0, 0))
    with pytest.raises(FormatError, match="divisible"):
        S.tile_matrix(torch.zeros(33, 64), 32)


def test_generator_definitions():
    # basis 0 (sin x cosh), every derivative cycle step is a quarter-period shift: sin, cos, -sin, -cos
    seeds = [S.pack(S.Seed(S.quantize_r(0.5), S.quantize_theta(0.3), 0, k, 0, 0, 0)) for k in range(4)]
    t = S.generate(torch.tensor([v - 2**64 if v >= 2**63 else v for v in seeds]), 8)
    assert torch.allclose(t[2], -t[0]) and torch.allclose(t[3], -t[1])
    theta_ij, d_ij = S.disk_grid(8)
    r = (S.quantize_r(0.5) + 0.5) / 2**20
    th = (S.quantize_theta(0.3) + 0.5) / 2**24 * 2 * math.pi
    expect = (1 - r * r) ** -2 * torch.cos(th + theta_ij) * torch.cosh(r * d_ij)
    assert torch.allclose(t[1], expect)
    # the singular Jacobian (c r^2 >= 1) stays finite
    big = S.pack(S.Seed(2**20 - 1, 0, 5, 0, 1, 0, 3))
    assert torch.isfinite(S.generate(torch.tensor([big - 2**64 if big >= 2**63 else big]), 32)).all()


def test_encoder_recovers_a_generated_tile():
    truth = S.pack(S.Seed(S.quantize_r(0.37), S.quantize_theta(1.1), 6, 0, 0, 0, -1))
    w = S.generate(torch.tensor([truth]), 32).float()
    seeds, scale = S.encode(w, scaled=False, starts_kept=64, refine_steps=40)  # a wide search finds it exactly
    rec = S.generate(seeds, 32)
    assert float((rec - w).pow(2).sum() / w.pow(2).sum()) < 1e-3


def test_encoder_on_gaussian_tiles_respects_the_bound():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 32, 32, generator=g)
    seeds, scale = S.encode(w, scaled=True, refine_steps=6)
    rec = S.generate(seeds, 32, scale.half())  # the scale is stored in fp16
    rel = float(((rec - w).pow(2).sum() / w.pow(2).sum()).sqrt())
    assert 2 ** (-80 / 1024) <= rel <= 1.0  # never above the zero predictor; never below Shannon


def test_seed64_layer_rejects_tampered_seeds():
    layer = Seed64Linear(64, 32, bias=False, spec=Seed64Spec(tile=32))
    layer.load_packed(layer.encode(torch.randn(32, 64)))
    layer.validate()
    layer.weight.data[0, 0] |= 1  # a reserved bit
    with pytest.raises(FormatError, match="reserved"):
        layer.validate()
    with pytest.raises(FormatError, match="divisible"):
        Seed64Linear(48, 32, bias=False, spec=Seed64Spec(tile=32))
    with pytest.raises(FormatError, match="NaN"):
        layer.encode(torch.full((32, 64), float("nan")))
    with pytest.raises(FormatError, match="tile must be a power of two"):
        Seed64Spec(tile=24)
