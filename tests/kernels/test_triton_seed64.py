"""The seed64 Triton generator against the PyTorch generator, under TRITON_INTERPRET=1 on the CPU."""

import os

import pytest
import torch

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("without a GPU the kernels run under TRITON_INTERPRET=1 (conftest sets it)", allow_module_level=True)
pytest.importorskip("triton")

from hf_rbe.core import ops  # noqa: E402
from hf_rbe.core import seed64 as S  # noqa: E402
from hf_rbe.core.seed64_format import Seed64Spec  # noqa: E402
from hf_rbe.core.seed64_linear import Seed64Linear  # noqa: E402
from hf_rbe.kernels import triton_seed64 as T  # noqa: E402


@pytest.mark.parametrize("scaled", [True, False])
def test_generator_matches_reference_into_a_poisoned_buffer(scaled):
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
    seeds = torch.randint(-(2**63), 2**63 - 1, (12,), generator=g, dtype=torch.int64)
    scales = torch.rand(12, generator=g).half() if scaled else None
    out = torch.full((12, 16, 16), float("nan"))
    got = T.seed64_generate(seeds, 16, scales, out=out)
    assert got.data_ptr() == out.data_ptr() and torch.isfinite(out).all()
    ref = S.generate(seeds, 16, scales)
    err = (out.double() - ref).norm(dim=(1, 2)) / ref.norm(dim=(1, 2)).clamp_min(1e-30)
    assert (err < 1e-4).all(), err


def test_layer_kernel_matches_the_op_reference():
    torch.manual_seed(0)
    layer = Seed64Linear(64, 32, bias=False, spec=Seed64Spec(tile=16))
    layer.load_packed(layer.encode(torch.randn(32, 64)))
    x = torch.randn(3, 64)
    tensors, layout = layer.op_args()
    ref = ops.reference_linear(x, tensors, layout, None)
    y = T.linear(x, tensors, layout, None)
    assert float((y - ref).norm() / ref.norm()) < 1e-4


@pytest.mark.parametrize("radial", [(1, 0), (2, 0), (3, 1)])  # sinh, tanh, -sech tanh: odd in their argument
@pytest.mark.parametrize("r", [1, 700, 40_000])
def test_odd_radial_bases_near_the_centre(radial, r):
    """Near the disk's centre the radial argument is tiny, where sinh as a difference of two fp32
    exponentials cancels to noise; the kernel takes its series there."""
    b, d_r = radial
    packed = [S.pack(S.Seed(r=r, theta=12345, basis=(a << 2) | b, d_theta=1, d_r=d_r, rot=3, log2_c=c, reserved=0))
              for a in range(4) for c in (-4, 0)]
    seeds = torch.tensor([v - 2**64 if v >= 2**63 else v for v in packed], dtype=torch.int64)  # as int64 holds them
    for scales in (None, torch.full((seeds.numel(),), 0.5).half()):
        out = T.seed64_generate(seeds, 8, scales)
        ref = S.generate(seeds, 8, scales)
        err = (out.double() - ref).norm(dim=(1, 2)) / ref.norm(dim=(1, 2)).clamp_min(1e-30)
        assert (err < 1e-4).all(), err
