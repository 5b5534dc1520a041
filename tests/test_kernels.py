"""Triton kernels against their PyTorch references, under TRITON_INTERPRET=1 on the CPU.

Fresh random inputs every run (seeded from the clock, printed on failure), outputs poisoned
with NaN before each call, odd shapes, every residual kind and several code layouts.
"""

import os
import time

import pytest
import torch

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("without a GPU the kernels run under TRITON_INTERPRET=1 (conftest sets it)", allow_module_level=True)
pytest.importorskip("triton")

from hf_rbe import RBEConfig, RBELinear  # noqa: E402
from hf_rbe.codec.rbe import tables_for  # noqa: E402
from hf_rbe.format import pack_codes  # noqa: E402
from hf_rbe.kernels import reference as R  # noqa: E402
from hf_rbe.kernels import triton_rbe as T  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SEED = int(time.time_ns() % 2**31)


@pytest.fixture
def gen():
    torch.manual_seed(SEED)
    return SEED


def _err(y: torch.Tensor, ref: torch.Tensor) -> float:
    y, ref = y.detach(), ref.detach()
    return float((y.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


LAYOUTS = [  # (idx, sign, amp, deriv, cat, sub, amp_fine), dim
    ((7, 1, 2, 0, 0, 0, 0), 4),
    ((9, 1, 2, 0, 0, 0, 0), 6),
    ((4, 1, 1, 0, 0, 0, 0), 4),
    ((8, 1, 3, 1, 2, 1, 2), 8),  # every field on; codes span word boundaries (19 bits)
    ((16, 0, 8, 1, 2, 2, 3), 2),  # the widest (32-bit) code
]


@pytest.mark.parametrize("fields,dim", LAYOUTS)
@pytest.mark.parametrize("m", [1, 5, 33])
def test_rbe_stage_matches_reference(fields, dim, m, gen):
    n, k = 37, dim * 24
    width = sum(fields)
    codes = torch.randint(0, 2**width, (n, k // dim), dtype=torch.int64)
    words = pack_codes(codes, width)
    scale = (torch.rand(n, 3) + 0.1).half()
    table = torch.nn.functional.normalize(torch.randn(2 ** fields[0], dim), dim=1)
    lut = torch.rand(2 ** (fields[4] + fields[5]), 2 ** (fields[2] + fields[6]))
    x = torch.randn(m, k)
    y = torch.full((m, n), float("nan"))
    T.rbe_stage_matmul(x, y, words, scale, table, lut, fields, dim, accumulate=False)
    ref = R.rbe_matmul_reference(x, words, scale, table, lut, fields, dim)
    assert _err(y, ref) < 1e-5, f"seed {gen}"
    # accumulate adds onto what is there
    T.rbe_stage_matmul(x, y, words, scale, table, lut, fields, dim, accumulate=True)
    assert _err(y, 2 * ref) < 1e-5, f"seed {gen}"


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_int_residual_matches_reference(bits, gen):
    n, k, group = 19, 128, 32
    q = torch.randint(0, 2**bits, (n, k))
    words = pack_codes(q, bits)
    scale = torch.rand(n, k // group).half()
    x = torch.randn(3, k)
    y = torch.full((3, n), float("nan"))
    T.int_residual_matmul(x, y, words, scale, bits, group, accumulate=False)
    ref = x @ R.int_residual_reference(words, scale, bits, group, k).T
    assert _err(y, ref) < 1e-5, f"seed {gen}"


def test_fp8_residual_matches_reference(gen):
    n, k, group = 21, 64, 16
    values = (torch.randn(n, k) * 3).to(torch.float8_e4m3fn)
    values[0, :4] = torch.tensor([0.0, -0.0, 2**-9, -448.0]).to(torch.float8_e4m3fn)  # zero, subnormal, max
    scale = torch.rand(n, k // group).half()
    x = torch.randn(4, k)
    y = torch.full((4, n), float("nan"))
    T.fp8_residual_matmul(x, y, values, scale, group, accumulate=False)
    ref = x @ R.fp8_residual_reference(values, scale, group).T
    assert _err(y, ref) < 1e-5, f"seed {gen}"


@pytest.mark.parametrize("block", [1, 8, 64, 256])
def test_hadamard_matches_reference(block, gen):
    x = torch.randn(3, 512)
    signs = (torch.randint(0, 2, (512,)) * 2 - 1).float()
    y = T.hadamard_rotate(x, signs, block)
    assert _err(y, R.hadamard_rotate_reference(x, signs, block)) < 1e-6, f"seed {gen}"


@pytest.mark.parametrize("preset,residual", [("rbe-2.5", None), ("rbe-4", None), ("rbe-4.5", None), ("rbe-5", None),
                                             ("rbe-2.5", "int8"), ("rbe-2.5", "int4"), ("rbe-2.5", "fp8")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m", [1, 17])
def test_rbelinear_kernel_path_matches_reference_path(preset, residual, dtype, m, gen):
    kw = {} if residual is None else {"residual": residual, "residual_group_size": 32}
    spec = RBEConfig.from_preset(preset, **kw).base_spec()
    lin = torch.nn.Linear(192, 45).to(dtype)
    q = RBELinear.from_linear(lin, spec, tables_for(spec), rotation_seed=gen)
    x = torch.randn(m, 192).to(dtype)
    q.backend = "reference"
    ref = q(x)
    q.backend = "triton"
    y = q(x)
    assert y.dtype == dtype and y.shape == ref.shape
    assert _err(y, ref) < (1e-5 if dtype == torch.float32 else 1e-2), f"seed {gen}"
