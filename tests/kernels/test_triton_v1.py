"""The v1 Triton kernels against the PyTorch reference (the core decoder and the op's reference),
under TRITON_INTERPRET=1 on the CPU.

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
from hf_rbe.core import codec, ops  # noqa: E402
from hf_rbe.core.bits import pack_codes  # noqa: E402
from hf_rbe.core.format import CodeLayout, ResidualSpec, StageSpec  # noqa: E402
from hf_rbe.core.rbe_codecs import universal_tables  # noqa: E402
from hf_rbe.core.rotation import rotate  # noqa: E402
from hf_rbe.core.tables import StageTables  # noqa: E402
from hf_rbe.kernels import triton_v1 as T  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SEED = int(time.time_ns() % 2**31)


@pytest.fixture
def gen():
    torch.manual_seed(SEED)
    return SEED


def _err(y: torch.Tensor, ref: torch.Tensor) -> float:
    y, ref = y.detach(), ref.detach()
    return float((y.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30))


LAYOUTS = [  # code layout, dim
    (CodeLayout(idx=7, sign=1, amp=2), 4),
    (CodeLayout(idx=9, sign=1, amp=2), 6),
    (CodeLayout(idx=4, sign=1, amp=1), 4),
    (CodeLayout(idx=8, sign=1, amp=3, deriv=1, cat=2, sub=1, amp_fine=2), 8),  # every field; codes span words (19 bits)
    (CodeLayout(idx=16, sign=0, amp=8, deriv=1, cat=2, sub=2, amp_fine=3), 2),  # the widest (32-bit) code
]


@pytest.mark.parametrize("layout,dim", LAYOUTS)
@pytest.mark.parametrize("m", [1, 5, 33])
def test_rbe_stage_matches_reference(layout, dim, m, gen):
    n, k = 37, dim * 24
    codes = torch.randint(0, 2**layout.width, (n, k // dim), dtype=torch.int64)
    words = pack_codes(codes, layout.width)
    scale = (torch.rand(n, 3) + 0.1).half()
    table = torch.nn.functional.normalize(torch.randn(layout.table_size, dim), dim=1)
    lut = torch.rand(layout.n_curves, layout.n_levels)
    x = torch.randn(m, k)
    y = torch.full((m, n), float("nan"))
    T.rbe_stage_matmul(x, y, words, scale, table, lut, layout, dim, accumulate=False)
    stage = StageSpec(dim=dim, layout=layout, group_size=k // 3)
    ref = x @ codec.decode_stage(words, scale, stage, StageTables(table, lut), k).T
    assert _err(y, ref) < 1e-5, f"seed {gen}"
    # accumulate adds onto what is there
    T.rbe_stage_matmul(x, y, words, scale, table, lut, layout, dim, accumulate=True)
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
    ref = x @ codec.decode_int_residual(words, scale, ResidualSpec(f"int{bits}", group), k).T
    assert _err(y, ref) < 1e-5, f"seed {gen}"


def test_fp8_residual_matches_reference(gen):
    n, k, group = 21, 64, 16
    values = (torch.randn(n, k) * 3).to(torch.float8_e4m3fn)
    values[0, :4] = torch.tensor([0.0, -0.0, 2**-9, -448.0]).to(torch.float8_e4m3fn)  # zero, subnormal, max
    scale = torch.rand(n, k // group).half()
    x = torch.randn(4, k)
    y = torch.full((4, n), float("nan"))
    T.fp8_residual_matmul(x, y, values, scale, group, accumulate=False)
    ref = x @ codec.decode_fp8_residual(values, scale, ResidualSpec("fp8", group)).T
    assert _err(y, ref) < 1e-5, f"seed {gen}"


@pytest.mark.parametrize("block", [1, 8, 64, 256])
def test_hadamard_matches_reference(block, gen):
    x = torch.randn(3, 512)
    signs = (torch.randint(0, 2, (512,)) * 2 - 1).float()
    y = T.hadamard_rotate(x, signs, block)
    assert _err(y, rotate(x.double(), signs, block)) < 1e-6, f"seed {gen}"


@pytest.mark.parametrize("preset,residual", [("rbe-2.5", None), ("rbe-4", None), ("rbe-4.5", None), ("rbe-5", None),
                                             ("rbe-2.5", "int8"), ("rbe-2.5", "int4"), ("rbe-2.5", "fp8")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m", [1, 17])
def test_layer_kernel_matches_the_op_reference(preset, residual, dtype, m, gen):
    kw = {} if residual is None else {"residual": residual, "residual_group_size": 32}
    spec = RBEConfig.from_preset(preset, **kw).base_spec()
    lin = torch.nn.Linear(192, 45).to(dtype)
    q = RBELinear.from_linear(lin, spec, universal_tables(spec), rotation_seed=gen)
    x = torch.randn(m, 192).to(dtype)
    tensors, layout = q.op_args()
    ref = ops.reference_linear(x, tensors, layout, q.bias)
    y = T.linear(x, tensors, layout, q.bias)
    assert y.dtype == dtype and y.shape == ref.shape
    assert _err(y, ref) < (1e-5 if dtype == torch.float32 else 1e-2), f"seed {gen}"
