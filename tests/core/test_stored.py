"""``stored_linear``: a head stored in half precision, multiplied in its storage dtype, returned in
the input's dtype, whichever torch kernel computes it (one bf16 row on the CPU goes to
``torch.mv``, everything else to ``F.linear``)."""

import pytest
import torch
import torch.nn.functional as F

from hf_rbe.core.stored import stored_linear

N, K = 300, 96


@pytest.mark.parametrize("shape", [(K,), (1, K), (1, 1, K), (4, K), (2, 3, K)])
@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [False, True])
def test_a_stored_head_computes_what_the_storage_dtype_product_does(shape, storage, bias):
    torch.manual_seed(0)
    w = (torch.randn(N, K) * 0.05).to(storage)
    b = torch.randn(N) if bias else None
    x = torch.randn(shape)
    y = stored_linear(x, w, b)
    assert y.dtype == x.dtype and y.shape == (*shape[:-1], N)
    want = F.linear(x.to(storage), w, None if b is None else b.to(storage)).float()
    exact = F.linear(x, w.float(), b)
    # the product rounded once to the storage dtype, as F.linear's is: within its rounding of the exact one
    eps = torch.finfo(storage).eps
    assert (y - exact).abs().max() <= eps * (exact.abs().max() + 1)
    assert torch.allclose(y, want, rtol=eps, atol=eps * float(want.abs().max()))


def test_a_decoding_row_passes_its_gradient_as_the_matrix_product_does():
    torch.manual_seed(1)
    w = (torch.randn(N, K) * 0.05).bfloat16()
    x = torch.randn(1, 1, K, requires_grad=True)
    stored_linear(x, w).pow(2).sum().backward()
    x2 = x.detach().clone().requires_grad_()
    F.linear(x2.bfloat16(), w).float().pow(2).sum().backward()
    assert torch.allclose(x.grad, x2.grad, rtol=1e-2, atol=1e-3)
