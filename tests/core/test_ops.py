"""The layer op ``hf_rbe::linear``: registered once, consistent fake and autograd (torch's opcheck)."""

import pytest
import torch

from hf_rbe.core import LayerSpec, RBELinear, Seed64Linear, Seed64Spec, ops
from hf_rbe.core.rbe_codecs import universal_tables
from hf_rbe.core.spec import FormatError


def _layers() -> list[torch.nn.Module]:
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 32)
    spec = LayerSpec()
    rbe = RBELinear.from_linear(lin, spec, universal_tables(spec))
    seed = Seed64Linear(64, 32, True, Seed64Spec(tile=16))
    seed.load_packed(seed.encode(lin.weight.detach()))
    return [rbe, seed]


def test_the_op_is_registered_with_torch():
    assert torch.ops.hf_rbe.linear.default is not None


@pytest.mark.parametrize("layer", _layers(), ids=["rbe", "seed64"])
def test_opcheck(layer):
    tensors, layout = layer.op_args()
    x = torch.randn(3, 64, requires_grad=True)
    torch.library.opcheck(ops.linear, (x, tensors, layout, layer.bias))
    torch.library.opcheck(ops.dequantize, (tensors, layout))


def test_unknown_format_is_a_format_error():
    with pytest.raises(FormatError, match="unknown packed-layer format id"):
        ops.reference_linear(torch.zeros(1, 4), [], [99, 4, 4], None)
