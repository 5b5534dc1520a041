"""The compiled e8p search equals the PyTorch reference bit for bit (codes and flips), ties included."""

import pytest
import torch

from hf_rbe.core import codec_v2 as C
from hf_rbe.core.format_v2 import LayerSpecV2
from hf_rbe.core.rbe_codecs import universal_tables

pytest.importorskip("numba")
from hf_rbe.kernels import cpu_search  # noqa: E402


def _table() -> torch.Tensor:
    return universal_tables(LayerSpecV2())["table"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_search_equals_the_reference(dtype, seed):
    g = torch.Generator().manual_seed(seed)
    mag, parity = C.e8p_parts(_table().to(dtype))
    u = torch.randn(3000, 8, generator=g, dtype=dtype) * (0.5 + 2 * torch.rand(3000, 1, generator=g, dtype=dtype))
    u[:100] = 0.0  # every entry's score of a zero vector is its |m|^2: ties between entries decide nothing else
    u[100:200] = u[100:200].abs().round()  # coordinates equal to each other: ties between flip costs
    got, want = cpu_search.e8p_search(u, mag, parity), C.e8p_search(u, mag, parity)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert (want[1] >= 0).any() and (want[1] < 0).any()  # both branches ran


def test_exact_ties_take_the_first_entry_and_the_first_coordinate():
    mag = torch.tensor([[1.0] * 8, [1.0] * 8, [2.0] * 8])
    parity = torch.tensor([1, 1, 0])  # entries 0 and 1 tie; the odd ones need a flip for a positive u
    u = torch.full((1, 8), 1.0)
    for search in (C.e8p_search, cpu_search.e8p_search):
        idx, flip = search(u, mag, parity)
        assert int(idx) == 0 and int(flip) == 0


def test_the_encoder_uses_it_on_the_cpu_and_finds_the_nearest_codewords():
    """``codec_v2.nearest`` goes through the installed search (kernels imported) and stays exact."""
    import hf_rbe.kernels.dispatch  # noqa: F401  (installs the search)

    assert C._cpu_search is not None
    table = _table()
    u = torch.randn(2000, 8, generator=torch.Generator().manual_seed(5))
    codes, values = C.nearest(u, "e8p", table)
    C.set_cpu_search(None)
    try:
        ref_codes, ref_values = C.nearest(u, "e8p", table)
    finally:
        C.set_cpu_search(hf_rbe.kernels.dispatch._cpu_e8p_search)
    assert torch.equal(codes, ref_codes) and torch.equal(values, ref_values)
