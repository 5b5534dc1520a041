"""The compiled stage decode equals the PyTorch reference bit for bit, for every plane, and takes
over from it only where it may (CPU tensors it fits, no autograd)."""

import pytest
import torch

from hf_rbe.core import codec_v2 as C
from hf_rbe.core.format_v2 import PLANES, LayerSpecV2
from hf_rbe.core.rbe_codecs import universal_tables

pytest.importorskip("numba")
import hf_rbe.kernels.dispatch  # noqa: E402,F401  (installs the decoder)
from hf_rbe.kernels import cpu_decode  # noqa: E402


def _stored(plane: str, n: int, k: int, g: torch.Generator) -> torch.Tensor:
    p = PLANES[plane]
    codes = torch.randint(0, 1 << p.bits, (n, k // 8), generator=g)
    return C.pack_plane(codes, plane)


def _table(plane: str, g: torch.Generator) -> torch.Tensor:
    if plane == "e8p":
        return universal_tables(LayerSpecV2())["table"]
    rows = PLANES[plane].table_size
    t = torch.randn(rows, 8, generator=g) * 1.7
    return t.abs() if plane == "b1" else t


@pytest.mark.parametrize("plane", sorted(PLANES))
@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("scale_dtype", [torch.float16, torch.float32])
def test_decode_equals_the_reference(plane, groups, scale_dtype):
    g = torch.Generator().manual_seed(len(plane) * 7 + groups)
    n, k = 37, 8 * 6 * groups
    stored, table = _stored(plane, n, k, g), _table(plane, g)
    scale = (torch.randn(n, groups, generator=g) * 3).to(scale_dtype)
    scale[0, 0] = 0.0
    scale[1, 0] = -0.0  # a zero scale's sign shows in the products: both must agree
    got = cpu_decode.decode_stage(stored, scale, plane, table, k)
    want = C.reference_decode_stage(stored, scale, plane, table, k)
    assert got.dtype == torch.float32 and got.shape == (n, k)
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))  # bit for bit, signed zeros included


def test_the_layer_decode_goes_through_it_and_autograd_does_not():
    """``decode_stage`` uses the kernel for plain CPU calls, and the reference where a scale needs a
    gradient (the reference's graph is what autograd differentiates)."""
    assert C._cpu_decode is not None
    g = torch.Generator().manual_seed(3)
    stored, table = _stored("e8p", 8, 64, g), _table("e8p", g)
    stage = LayerSpecV2().stages[0]
    calls = []
    real = C._cpu_decode
    C.set_cpu_decode(lambda *a: calls.append(1) or real(*a))
    try:
        plain = C.decode_stage(stored, torch.rand(8, 1, generator=g), stage, table, 64)
        scale = torch.rand(8, 1, generator=g, requires_grad=True)
        tracked = C.decode_stage(stored, scale, stage, table, 64)
    finally:
        C.set_cpu_decode(real)
    assert len(calls) == 1 and not plain.requires_grad
    assert tracked.requires_grad
    tracked.sum().backward()
    assert scale.grad is not None and scale.grad.abs().sum() > 0


@pytest.mark.parametrize("bad", ["table rows", "codes dtype", "scale rows", "groups"])
def test_what_it_cannot_index_goes_to_the_reference(bad):
    """The kernel reads without bounds checks, so arguments of the wrong shape never reach it: the
    reference decodes them or raises its own error."""
    g = torch.Generator().manual_seed(4)
    stored, table, scale = _stored("vq8", 6, 48, g), _table("vq8", g), torch.rand(6, 2, generator=g)
    if bad == "table rows":
        table = table[:100]
    elif bad == "codes dtype":
        stored = stored.to(torch.int16)
    elif bad == "scale rows":
        scale = scale[:5]
    else:
        scale = torch.rand(6, 4, generator=g)  # 6 vectors a row do not split into 4 groups
    assert not cpu_decode.fits(stored, scale, "vq8", table, 48)
    assert cpu_decode.fits(_stored("vq8", 6, 48, g), torch.rand(6, 2, generator=g), "vq8", _table("vq8", g), 48)
