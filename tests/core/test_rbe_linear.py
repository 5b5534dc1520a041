import pytest
import torch
from conftest import rel_mse
from torch import nn

from hf_rbe import RBEConfig, RBELinear
from hf_rbe.core.rbe_codecs import universal_tables
from hf_rbe.core.spec import FormatError


def _layer(preset="rbe-2.5", bias=True, dtype=torch.float32, k=192, n=40):
    torch.manual_seed(0)
    lin = nn.Linear(k, n, bias=bias).to(dtype)
    spec = RBEConfig.from_preset(preset).base_spec()
    return lin, RBELinear.from_linear(lin, spec, universal_tables(spec), rotation_seed=11)


@pytest.mark.parametrize("preset", ["rbe-1.5", "rbe-2.5", "rbe-4", "rbe-4.5"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_forward_matches_dequantized_linear(preset, dtype):
    lin, q = _layer(preset, dtype=dtype)
    x = torch.randn(2, 3, 192).to(dtype)
    y = q(x)
    assert y.dtype == dtype and y.shape == (2, 3, 40)
    ref = x.double() @ q.dequantize(torch.float64).T + q.bias.double()
    tol = 1e-10 if dtype == torch.float32 else 2e-4
    assert rel_mse(y, ref) < tol
    assert rel_mse(q.dequantize(torch.float32), lin.weight.float()) < 0.25


def test_is_a_linear_with_packed_weight():
    lin, q = _layer()
    assert isinstance(q, nn.Linear)
    assert q.weight.dtype == torch.int32 and q.in_features == 192 and q.out_features == 40
    assert q.compute_dtype == torch.float32
    assert not any(p.requires_grad for n, p in q.named_parameters() if n != "bias")


def test_per_layer_table_is_no_worse_than_universal():
    torch.manual_seed(3)
    lin = nn.Linear(128, 64)
    spec = RBEConfig(format_version=1).base_spec()
    uni = RBELinear.from_linear(lin, spec, universal_tables(spec))
    own = RBELinear.from_linear(lin, spec, None)
    assert own.owns_table and own.table_key is None
    assert rel_mse(own.dequantize(), lin.weight) <= rel_mse(uni.dequantize(), lin.weight) * 1.02


def test_bad_inputs():
    _, q = _layer()
    with pytest.raises(TypeError, match="float16/bfloat16/float32"):
        q(torch.ones(2, 192, dtype=torch.int64))
    with pytest.raises(ValueError, match="features"):
        q(torch.ones(2, 191))
    with pytest.raises(FormatError, match="shape"):
        q.load_packed({"scale": torch.zeros(3, 3, dtype=torch.float16)})


def test_validate_catches_tampering():
    _, q = _layer()
    q.validate()
    q.scale.data[0, 0] = float("nan")
    with pytest.raises(FormatError, match="scale"):
        q.validate()
    _, q = _layer()
    q.table.data[0] *= 2
    with pytest.raises(FormatError, match="unit"):
        q.validate()


def test_storage_accounting():
    _, q = _layer("rbe-2.5", k=96, n=40)
    # 24 codes of 10 bits = 240 bits = 8 words per row; one fp16 scale per row; 64-bit seed
    assert q.weight.shape == (40, 8)
    assert q.storage_bits(include_tables=False) == 40 * 8 * 32 + 40 * 16 + 64
    assert q.storage_bits(include_tables=True) > q.storage_bits(include_tables=False)
