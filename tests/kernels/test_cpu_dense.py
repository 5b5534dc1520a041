"""The numba product of a bf16 weight and one row (a decoding step's stored head) against fp64 sums
of the same bf16 values, and ``stored_linear``'s use of it: taken for one plain row, left to
``torch.mv`` where a gradient is recorded, the kernels are off, or the weight does not fit."""

import random
import time

import pytest
import torch

pytest.importorskip("numba")

from hf_rbe.core import ops, stored  # noqa: E402
from hf_rbe.kernels import cpu_dense  # noqa: E402

SEED = int(time.time_ns() % 2**31)
RNG = random.Random(SEED)


@pytest.mark.parametrize("n", [1, 7, 8, 9, 300])  # whole blocks of eight rows, a tail, both
@pytest.mark.parametrize("k", [8, 96, 576])
def test_row_product_is_the_fp32_sum_of_exact_products(n, k):
    torch.manual_seed(SEED)
    w = (torch.randn(n, k) * 10 ** RNG.uniform(-3, 1)).bfloat16()
    x = (torch.randn(k) * 10 ** RNG.uniform(-3, 3)).bfloat16()
    y = cpu_dense.row_product(w, x)
    exact = w.double() @ x.double()
    bound = 1e-6 * (w.double().norm(dim=1) * x.double().norm())  # fp32 rounding of K additions
    assert y.dtype == torch.float32 and y.shape == (n,)
    assert ((y.double() - exact).abs() <= bound).all(), f"seed {SEED}"


def test_fits_only_contiguous_bf16_matrices_of_whole_vectors():
    w = torch.zeros(16, 64, dtype=torch.bfloat16)
    assert cpu_dense.fits(w)
    assert not cpu_dense.fits(torch.zeros(16, 60, dtype=torch.bfloat16))  # K not a multiple of 8
    assert not cpu_dense.fits(w.half())
    assert not cpu_dense.fits(torch.zeros(64, 16, dtype=torch.bfloat16).T)  # not contiguous


@pytest.fixture
def calls(monkeypatch):
    seen = []
    installed = stored._cpu_row_product
    assert installed is not None, "hf_rbe.kernels installs the row product"

    def spy(weight, row):
        seen.append(row.dtype)
        return installed(weight, row)

    monkeypatch.setattr(stored, "_cpu_row_product", spy)
    return seen


def test_stored_linear_takes_the_kernel_for_one_plain_row(calls):
    torch.manual_seed(SEED)
    w = (torch.randn(300, 96) * 0.05).bfloat16()
    x = torch.randn(1, 1, 96)
    y = stored.stored_linear(x, w)
    want = torch.mv(w, x.reshape(-1).bfloat16()).float().view(1, 1, 300)
    assert calls == [torch.bfloat16]  # the row rounded to bf16 first, as the bf16 product rounds it
    step = want.abs() * 2**-7 + torch.finfo(torch.bfloat16).tiny  # one bf16 step: a sum on a rounding edge
    assert y.dtype == torch.float32 and ((y - want).abs() <= step).all(), f"seed {SEED}"
    assert torch.equal(y, y.bfloat16().float())  # rounded to bf16, as torch.mv's result is


@pytest.mark.parametrize("why", ["grad", "reference_only", "odd_width"])
def test_stored_linear_leaves_other_rows_to_torch_mv(calls, why):
    torch.manual_seed(SEED)
    k = 100 if why == "odd_width" else 96
    w = (torch.randn(40, k) * 0.05).bfloat16()
    x = torch.randn(1, k, requires_grad=why == "grad")
    if why == "reference_only":
        with ops.reference_only():
            y = stored.stored_linear(x, w)
    else:
        y = stored.stored_linear(x, w)
    assert calls == ([] if why == "grad" else [torch.bfloat16])  # asked, and it declined: no kernels / the width
    assert torch.equal(y.detach(), torch.mv(w, x.detach().reshape(-1).bfloat16()).float().view(1, 40))
