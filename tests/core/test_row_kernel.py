"""A packed layer keeps its device kernel's one-row form (``ops.row_kernel``) between decoding
calls, and uses it only while that is what the op would compute.

A counting stand-in is registered for the CPU, so these tests see when a layer prepares a row
kernel and when it calls one, whatever kernels this machine has; the real CPU row kernel is
checked against the reference in ``tests/kernels/test_cpu_numba.py``.
"""

import copy

import pytest
import torch

from hf_rbe.core import LayerSpecV2, RBELinear, StageV2, ops
from hf_rbe.core.rbe_codecs import universal_tables

K, N = 64, 24
SPEC = LayerSpecV2((StageV2("e8p"), StageV2("vq8")))


class Counting:
    """A row kernel factory: the reference, counting preparations and calls."""

    def __init__(self) -> None:
        self.prepared = self.called = 0

    def __call__(self, tensors: list[torch.Tensor], layout: list[int]) -> ops.RowKernel:
        self.prepared += 1

        def row(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
            self.called += 1
            return ops.reference_linear(x, tensors, layout, bias)

        return row


@pytest.fixture
def counting(monkeypatch: pytest.MonkeyPatch) -> Counting:
    c = Counting()
    monkeypatch.setitem(ops._ROW_KERNELS, "cpu", c)
    return c


def _layer(bias: bool = True, seed: int = 0) -> RBELinear:
    torch.manual_seed(seed)
    layer = RBELinear.from_linear(torch.nn.Linear(K, N, bias=bias), SPEC, universal_tables(SPEC), rotation_seed=3)
    if bias:
        layer.bias.requires_grad_(False)
    return layer


def _want(layer: RBELinear, x: torch.Tensor) -> torch.Tensor:
    tensors, layout = layer.op_args()
    with ops.reference_only():
        return ops.reference_linear(x, tensors, layout, layer.bias)


@torch.no_grad()
def test_decoding_calls_prepare_once_and_then_call_the_row_kernel(counting):
    layer = _layer()
    xs = [torch.randn(1, 1, K) for _ in range(3)] + [torch.randn(K), torch.randn(1, K).bfloat16()]
    for x in xs:
        y = layer(x)
        assert y.shape == (*x.shape[:-1], N) and y.dtype == x.dtype
        assert torch.equal(y, _want(layer, x))
    assert (counting.prepared, counting.called) == (1, len(xs))


@pytest.mark.parametrize("how", ["in_place", "data_swap", "load_state_dict", "new_parameter"])
@torch.no_grad()
def test_an_edit_of_a_stored_tensor_prepares_the_row_kernel_again(counting, how):
    layer, other = _layer(), _layer(seed=1)
    x = torch.randn(1, K)
    before = layer(x)
    if how == "in_place":
        layer.scale.mul_(2)
    elif how == "data_swap":
        layer.weight.data = other.weight.data.clone()
    elif how == "load_state_dict":
        layer.load_state_dict(other.state_dict())
    else:
        layer.residual_scale = torch.nn.Parameter(other.residual_scale.clone(), requires_grad=False)
    after = layer(x)
    assert counting.prepared == 2, how
    assert not torch.equal(before, after) and torch.equal(after, _want(layer, x)), how


def test_calls_that_need_the_op_do_not_take_the_row_kernel(counting):
    layer = _layer()
    x = torch.randn(1, K)
    layer(x.clone().requires_grad_()).sum().backward()  # autograd must record the op
    with torch.no_grad():
        layer(torch.randn(3, K))  # more than one row
        with ops.reference_only():  # calibration's setting: the reference, every call
            layer(x)
    assert (counting.prepared, counting.called) == (0, 0)
    layer.bias.requires_grad_(True)  # a trainable bias: the op records its gradient
    layer(x).sum().backward()
    assert counting.called == 0 and layer.bias.grad is not None


@torch.no_grad()
def test_bad_input_still_gets_the_ops_errors(counting):
    layer = _layer()
    layer(torch.randn(1, K))
    with pytest.raises(ValueError, match="features"):
        layer(torch.randn(K, 1))  # one row's worth of numbers, the wrong shape
    with pytest.raises(TypeError, match="float"):
        layer(torch.ones(1, K, dtype=torch.int64))
    assert counting.called == 1


@torch.no_grad()
def test_inference_tensors_keep_the_row_kernel_until_one_is_replaced(counting):
    """A model loaded under ``torch.inference_mode()`` decodes through the row kernel too; a stored
    tensor put in its place (a new object) prepares it again, as for ordinary tensors."""
    with torch.inference_mode():
        layer, other = copy.deepcopy(_layer()), copy.deepcopy(_layer(seed=1))
        x = torch.randn(1, K)
        before = layer(x)
        assert torch.equal(before, _want(layer, x)) and torch.equal(layer(x), before)
        assert (counting.prepared, counting.called) == (1, 2)
        layer.weight = torch.nn.Parameter(other.weight.clone(), requires_grad=False)
        after = layer(x)
    assert counting.prepared == 2 and counting.called == 3
    assert not torch.equal(before, after) and torch.equal(after, _want(layer, x))


@torch.no_grad()
def test_a_moved_or_copied_layer_keeps_no_row_kernel_of_the_old_tensors(counting):
    layer = _layer()
    x = torch.randn(1, K)
    layer(x)
    assert "_row" in layer.__dict__ and "_row" not in layer.__getstate__()  # never pickled
    twin = copy.deepcopy(layer)
    twin.scale.mul_(3)
    assert torch.equal(twin(x), _want(twin, x)) and not torch.equal(twin(x), layer(x))
    layer.to(torch.float32)  # any move or cast goes through _apply
    assert "_row" not in layer.__dict__
