"""seed64: the paper's bit-layout test vectors, round trips, the generator, the encoder, the Triton twin."""

import math
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_rbe.codec import seed64 as S


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
    with pytest.raises(ValueError, match="log2_c"):
        S.pack(S.Seed(0, 0, 0, 0, 0, 0, 4))
    with pytest.raises(ValueError, match="basis"):
        S.pack(S.Seed(0, 0, 16, 0, 0, 0, 0))
    with pytest.raises(ValueError, match="divisible"):
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


@pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                    reason="Triton runs under the interpreter on CPU")
def test_triton_generator_matches_reference():
    from hf_rbe.kernels.triton_seed64 import seed64_generate

    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    seeds = torch.randint(-(2**63), 2**63 - 1, (12,), generator=g, dtype=torch.int64)
    scales = torch.rand(12, generator=g).half()
    theta_ij, d_ij = S.disk_grid(16)
    out = torch.full((12, 16, 16), float("nan"))
    out = seed64_generate(seeds, theta_ij, d_ij, scales)
    ref = S.generate(seeds, 16, scales)
    err = (out.double() - ref).norm(dim=(1, 2)) / ref.norm(dim=(1, 2)).clamp_min(1e-30)
    assert (err < 1e-4).all(), err


@pytest.mark.parametrize("residual", ["none", "rbe"])
def test_seed64_in_a_transformers_model(tiny_llama_dir, tmp_path, residual):
    import subprocess
    import sys

    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from hf_rbe import RBEConfig
    from hf_rbe.seed64_module import Seed64Linear

    kw = {"residual_stage": {"dim": 4, "idx": 7, "amp": 2}} if residual == "rbe" else {}
    cfg = RBEConfig(codec="seed64", tile=32, residual=residual, **kw)
    ref = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    m = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=cfg)
    layer = m.model.layers[0].mlp.up_proj
    assert isinstance(layer, Seed64Linear) and (layer.residual is not None) == (residual == "rbe")
    w = ref.model.layers[0].mlp.up_proj.weight
    rel = float((layer.dequantize() - w).pow(2).sum() / w.pow(2).sum())
    assert rel <= 1.0 + 1e-6 and (residual == "none" or rel < 0.1), rel
    expected_bpw = (64 + 16) / 32**2 + (layer.residual.bits_per_weight if layer.residual is not None else 0)
    assert layer.bits_per_weight == pytest.approx(expected_bpw)
    ids = torch.tensor([[1, 5, 9, 33]])
    with torch.no_grad():
        logits = m(ids).logits
    assert torch.isfinite(logits).all()
    m.save_pretrained(tmp_path)
    save_file({"logits": logits.contiguous()}, tmp_path / "expected.safetensors")
    code = ("import torch, hf_rbe; from safetensors.torch import load_file; from transformers import AutoModelForCausalLM;"
            f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r});"
            "out = m(torch.tensor([[1, 5, 9, 33]])).logits.detach();"
            f"assert torch.equal(out, load_file({str(tmp_path / 'expected.safetensors')!r})['logits']); print('identical')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "identical" in res.stdout, res.stderr[-2000:]


def test_seed64_config_errors():
    from hf_rbe import RBEConfig

    with pytest.raises(ValueError, match="residual"):
        RBEConfig(codec="seed64", residual="int8")
    with pytest.raises(ValueError, match="tile"):
        RBEConfig(codec="seed64", tile=24)
    with pytest.raises(ValueError, match="codec"):
        RBEConfig(codec="jpeg")


def test_seed64_layer_rejects_tampered_seeds():
    from hf_rbe.format import FormatError
    from hf_rbe.seed64_module import Seed64Linear

    layer = Seed64Linear(64, 32, bias=False, tile=32)
    layer.load_encoded(layer.encode(torch.randn(32, 64)))
    layer.validate()
    layer.weight.data[0, 0] |= 1  # a reserved bit
    with pytest.raises(FormatError, match="reserved"):
        layer.validate()
    with pytest.raises(FormatError, match="divisible"):
        Seed64Linear(48, 32, bias=False, tile=32)
    with pytest.raises(ValueError, match="NaN"):
        layer.encode(torch.full((32, 64), float("nan")))
