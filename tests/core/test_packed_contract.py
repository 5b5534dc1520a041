"""The PackedLinear contract, one suite over every layer class and its variants.

Each case builds a layer from a random Linear through the layer's one encode entry point and
checks what every packed layer promises: stored tensors exactly as its format describes them,
a forward pass equal to ``x W^T + b`` with the decoded weight, gradients to the input, strict
loading, a state dict that round-trips, honest storage accounting, and every device.
"""

from collections.abc import Callable

import pytest
import torch
from conftest import rel_mse
from torch import nn

from hf_rbe.core import LayerSpec, LayerSpecV2, PackedLinear, RBELinear, Seed64Linear, Seed64Spec, StageV2
from hf_rbe.core.format import CodeLayout, ResidualSpec, StageSpec
from hf_rbe.core.rbe_codecs import universal_tables
from hf_rbe.core.spec import FormatError

K, N = 64, 48


def _rbe(spec: LayerSpec, universal: bool = True) -> Callable[[nn.Linear], RBELinear]:
    return lambda lin: RBELinear.from_linear(lin, spec, universal_tables(spec) if universal else None, rotation_seed=5)


def _seed64(spec: Seed64Spec) -> Callable[[nn.Linear], Seed64Linear]:
    def make(lin: nn.Linear) -> Seed64Linear:
        layer = Seed64Linear(K, N, lin.bias is not None, spec, rotation_seed=5)
        layer.load_packed(layer.encode(lin.weight.detach(), universal_tables(spec.residual) if spec.residual else None))
        if lin.bias is not None:
            layer.bias.data.copy_(lin.bias.detach())
        return layer

    return make


STAGE = StageSpec(dim=4, layout=CodeLayout(idx=7, sign=1, amp=2))
CASES = {
    "rbe-2.5": (_rbe(LayerSpec(stage=STAGE)), 0.1),
    "rbe+rbe residual": (_rbe(LayerSpec(stage=STAGE, residual=ResidualSpec("rbe", stage=STAGE))), 0.05),
    "rbe+int2, groups": (_rbe(LayerSpec(stage=StageSpec(4, STAGE.layout, 32), residual=ResidualSpec("int2", 32))), 0.05),
    "rbe+fp8, no rotation": (_rbe(LayerSpec(stage=STAGE, residual=ResidualSpec("fp8", 16), rotation=False)), 0.01),
    "rbe per-layer table": (_rbe(LayerSpec(stage=STAGE), universal=False), 0.1),
    "v2 e8p": (_rbe(LayerSpecV2()), 0.1),
    "v2 e8p+vq4, groups": (_rbe(LayerSpecV2((StageV2("e8p", 32), StageV2("vq4", 32)))), 0.07),
    "v2 e8p+vq8+e8p, no rotation": (_rbe(LayerSpecV2((StageV2("e8p"), StageV2("vq8"), StageV2("e8p")),
                                                     rotation=False)), 0.01),
    "v2 per-layer table": (_rbe(LayerSpecV2(), universal=False), 0.1),
    "seed64 scaled": (_seed64(Seed64Spec(tile=16)), 1.0),
    "seed64 unscaled": (_seed64(Seed64Spec(tile=16, scaled=False)), None),
    "seed64+rbe residual": (_seed64(Seed64Spec(tile=16, residual=LayerSpec(stage=STAGE))), 0.1),
}


@pytest.fixture(params=list(CASES), scope="module")
def case(request: pytest.FixtureRequest) -> tuple[nn.Linear, PackedLinear, float | None]:
    torch.manual_seed(0)
    lin = nn.Linear(K, N)
    make, max_err = CASES[request.param]
    return lin, make(lin), max_err


def test_is_a_linear_with_packed_frozen_storage(case):
    lin, layer, _ = case
    assert isinstance(layer, nn.Linear) and (layer.in_features, layer.out_features) == (K, N)
    assert not layer.weight.is_floating_point()
    assert all(not p.requires_grad for n, p in layer.named_parameters() if n != "bias")
    assert layer.bias.dtype == layer.compute_dtype


def test_stored_tensors_are_exactly_the_format(case):
    _, layer, _ = case
    own = {n: p for n, p in layer.named_parameters(recurse=False) if n != "bias"}
    spec = layer.stored_tensors()
    assert set(own) == set(spec)
    for name, t in own.items():
        spec[name].check(name, t)
    saved = {k for k in layer.state_dict() if "." not in k}
    assert saved == set(spec) | {"bias"}  # derived buffers (signs, linked tables) are not saved


def test_encode_is_deterministic(case):
    lin, layer, _ = case
    a, b = layer.encode(lin.weight.detach()), layer.encode(lin.weight.detach())
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_forward_is_x_times_the_decoded_weight(case):
    lin, layer, max_err = case
    x = torch.randn(3, 5, K)
    ref = x.double() @ layer.dequantize(torch.float64).T + layer.bias.double()
    assert rel_mse(layer(x), ref) < 1e-10
    if max_err is not None:
        assert rel_mse(layer.dequantize(), lin.weight) < max_err
    assert rel_mse(layer.to_linear()(x), layer(x)) < 1e-12


def test_gradient_reaches_the_input_and_the_bias(case):
    _, layer, _ = case
    x = torch.randn(4, K, requires_grad=True)
    layer.bias.requires_grad_(True)
    g = torch.randn(4, N)
    (layer(x) * g).sum().backward()
    assert torch.allclose(x.grad, g @ layer.dequantize(), atol=1e-4)
    assert torch.allclose(layer.bias.grad, g.sum(0), atol=1e-5)
    layer.bias.grad = None
    layer.bias.requires_grad_(False)


def test_load_packed_is_strict(case):
    _, layer, _ = case
    name, ts = next(iter(layer.stored_tensors().items()))
    with pytest.raises(FormatError, match="unexpected tensor 'nope'"):
        layer.load_packed({"nope": torch.zeros(1)})
    with pytest.raises(FormatError, match="the format stores"):
        layer.load_packed({name: torch.zeros(ts.shape, dtype=torch.float64)})
    with pytest.raises(FormatError, match="shape"):
        layer.load_packed({name: torch.zeros(tuple(s + 1 for s in ts.shape), dtype=ts.dtype)})


def test_state_dict_round_trips_into_a_fresh_layer(case):
    _, layer, _ = case
    kw = {"residual_table_key": None} if isinstance(layer, Seed64Linear) else {"table_key": layer.table_key}
    fresh = type(layer)(K, N, True, layer.spec, **kw)
    fresh.load_state_dict(layer.state_dict())
    for m in fresh.modules():
        if isinstance(m, PackedLinear):
            m.rebuild_buffers()
    fresh.validate()
    x = torch.randn(2, K)
    assert torch.equal(fresh(x), layer(x))


def test_storage_is_counted_from_what_is_stored(case):
    _, layer, _ = case
    stored = sum(t.numel() * t.element_size() * 8 for k, t in layer.state_dict().items() if not k.endswith("bias"))
    assert layer.storage_bits() == stored
    assert layer.bits_per_weight * K * N <= stored


def test_runs_on_every_device(case, device):
    _, layer, _ = case
    x = torch.randn(2, K)
    ref = layer(x)
    out = layer.to(device)(x.to(device)).cpu()
    layer.to("cpu")
    assert rel_mse(out, ref) < 1e-10


def test_model_casts_never_change_stored_dtypes(case):
    import copy

    _, layer, _ = case
    layer = copy.deepcopy(layer)
    dtypes = {n: p.dtype for n, p in layer.named_parameters() if n != "bias"}
    decoded = layer.dequantize(torch.float32)
    layer.to(torch.bfloat16)  # what model.to(dtype) / .half() / .bfloat16() do to every submodule
    assert {n: p.dtype for n, p in layer.named_parameters() if n != "bias"} == dtypes
    assert torch.equal(layer.dequantize(torch.float32), decoded)


def test_an_exact_cast_behind_its_back_is_undone_a_lossy_one_refused(case):
    import copy

    _, layer, _ = case
    layer = copy.deepcopy(layer)
    floats = [(n, p) for n, p in layer.named_parameters(recurse=False) if n != "bias" and p.is_floating_point()
              and p.dtype != torch.float32]
    if not floats:
        pytest.skip("no half-precision stored tensor in this format")
    name, p = floats[0]
    x = torch.randn(3, K)
    before = layer(x)
    dtype = p.dtype
    p.data = p.data.float()  # what PEFT's prepare_model_for_kbit_training does to every fp16 parameter
    assert torch.equal(layer(x), before) and getattr(layer, name).dtype == dtype
    getattr(layer, name).data = getattr(layer, name).data.float() * (1 + 2**-20)  # no longer an fp16 value
    with pytest.raises(FormatError, match=f"stored '{name}' was changed to torch.float32"):
        layer(x)
