"""The numba CPU kernel of format v2 against the op's PyTorch reference (fp32, 1e-5 relative).

Fresh random weights and shapes every run (seed printed on failure): every plane as a residual
stage, per-row and grouped scales, with and without rotation (Hadamard blocks below and at the
cap), M on both paths (code-walking GEMV and decode + BLAS). The kernels are compiled once per
session (numba caches them on disk), a few seconds on a cold cache.
"""

import copy
import random
import time

import numpy as np
import pytest
import torch

pytest.importorskip("numba")

from hf_rbe import RBELinear  # noqa: E402
from hf_rbe.core import ops  # noqa: E402
from hf_rbe.core.format_v2 import LayerSpecV2, StageV2  # noqa: E402
from hf_rbe.core.rbe_codecs import universal_tables  # noqa: E402
from hf_rbe.kernels import cpu_numba as C  # noqa: E402
from hf_rbe.kernels import dispatch  # noqa: E402

SEED = int(time.time_ns() % 2**31)
RNG = random.Random(SEED)
TOL = 1e-5


def _layer(spec: LayerSpecV2, k: int, n: int, bias: bool = True) -> RBELinear:
    torch.manual_seed(SEED)
    lin = torch.nn.Linear(k, n, bias=bias)
    return RBELinear.from_linear(lin, spec, universal_tables(spec), rotation_seed=SEED)


@torch.no_grad()
def _error(layer: RBELinear, x: torch.Tensor) -> float:
    tensors, layout = layer.op_args()
    y = C.linear(x, tensors, layout, layer.bias)
    ref = ops.reference_linear(x.float(), tensors, layout, None if layer.bias is None else layer.bias.float())
    assert y.dtype == x.dtype and y.shape == ref.shape
    return float((y.float() - ref).norm() / ref.norm())


def _random_spec() -> tuple[LayerSpecV2, int]:
    k = 64 * RNG.choice([1, 3, 4, 9, 12])  # blocks of 64 or up to 256
    stages = [StageV2(RNG.choice(["e8p", "b1"]), RNG.choice([None, 64]))]
    stages += [StageV2(RNG.choice(["e8p", "vq8", "vq4", "b1"]), RNG.choice([None, 32]))
               for _ in range(RNG.randint(0, 2))]
    return LayerSpecV2(tuple(stages), rotation=RNG.random() < 0.8), k


@pytest.mark.parametrize("case", range(6))
@pytest.mark.parametrize("m", [1, 2, 6, C.GEMV_MAX_M, C.GEMV_MAX_M + 1, 37])
def test_random_layers_match_the_reference(case, m):
    spec, k = _random_spec()
    layer = _layer(spec, k, RNG.randint(1, 70), bias=RNG.random() < 0.5)
    x = torch.randn(m, k)
    assert _error(layer, x) < TOL, f"seed {SEED}: {spec} k={k}"


@pytest.mark.parametrize("block", [2, 4, 8, 16, 32])
@pytest.mark.parametrize("m", [1, 5, C.GEMV_MAX_M + 3])
def test_small_hadamard_blocks(block, m):
    """Blocks inside one 8-lane vector take the scalar butterflies; from 8 on, the vector transform."""
    spec = LayerSpecV2((StageV2("e8p"), StageV2("vq8")), rotation=True, rotation_block=block)
    layer = _layer(spec, 96, 40)
    assert _error(layer, torch.randn(m, 96)) < TOL, f"seed {SEED}: block {block}"


@pytest.mark.parametrize("second", [None, "e8p", "vq8", "vq4", "b1"])
def test_the_bf16_decode_rounds_the_fp32_decode_to_nearest_even(second):
    """What the bf16 GEMM of prefill multiplies: the fp32 decode rounded as torch rounds (a second
    stage is summed by a fused multiply-add, so a rare last-bit tie may round the other way)."""
    stages = (StageV2("e8p", 32),) + (() if second is None else (StageV2(second, 64),))
    layer = _layer(LayerSpecV2(stages, rotation=False), 128, 24)
    tensors, layout = layer.op_args()
    plan = C._plan(tuple(layout), tensors)[0]
    want = layer.decode_rotated().bfloat16()
    got = C._decoded_bf16(plan, 24, 128)
    if second is None:
        assert torch.equal(got, want), f"seed {SEED}"
    else:
        step = (want.float().abs() * 2.0**-7).clamp_min(1e-30)  # one bf16 ulp, about
        assert ((got.float() - want.float()).abs() <= step).all() and (got == want).float().mean() > 0.97


@pytest.mark.parametrize("plane", ["e8p", "vq8", "vq4", "b1"])
@pytest.mark.parametrize("m", [1, 9])
def test_every_residual_plane(plane, m):
    spec = LayerSpecV2((StageV2("e8p"), StageV2(plane)))
    layer = _layer(spec, 512, 24)
    assert _error(layer, torch.randn(m, 512)) < TOL, f"seed {SEED}"


@pytest.mark.parametrize("k, group", [(40, None), (72, 24), (104, 8)])
@pytest.mark.parametrize("m", [1, 3])
def test_odd_row_counts_and_short_groups(k, group, m):
    """The M = 1 GEMV walks two output rows at a time (19 rows: the last alone), over groups of one to five codes."""
    spec = LayerSpecV2((StageV2("e8p", group), StageV2("vq8", group)), rotation=False)
    layer = _layer(spec, k, 19)
    assert _error(layer, torch.randn(m, k)) < TOL, f"seed {SEED}"


@pytest.mark.parametrize("planes", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("k, group", [(256, None), (96, 16), (192, 64), (104, 8), (40, None)])
@pytest.mark.parametrize("m", [1, 3])
def test_sign_plane_runs(planes, k, group, m):
    """Runs of b1 stages: at M = 1 one masked-add pass per up to four stages where rows and groups
    hold whole 16-bit words (the first three shapes), the vq8 form on expanded tables where not
    (groups of 8, rows of 40 weights) and at M > 1; 19 rows, the last walked alone."""
    spec = LayerSpecV2(tuple(StageV2("b1", group) for _ in range(planes)), rotation=k % 64 == 0)
    layer = _layer(spec, k, 19)
    assert _error(layer, torch.randn(m, k)) < TOL, f"seed {SEED}"
    tensors, layout = layer.op_args()
    plan = C._plan(tuple(layout), tensors)
    words = k % 16 == 0 and (group or k) % 16 == 0
    runs = [min(C.BITS_MAX_PLANES, planes - i) for i in range(0, planes, C.BITS_MAX_PLANES)]
    assert [kernel for kernel, _ in plan[3]] == ([C._BITS[r] for r in runs] if words else [C._GEMV[C._B1]] * planes)
    int8 = C.HAS_VNNI and k % 64 == 0 and (group or k) % 64 == 0  # the half-precision calls
    assert [kernel for kernel, _ in plan[4]] == ([C._BITS8[r] for r in runs] if int8 else
                                                 [kernel for kernel, _ in plan[3]])


def _unrounded(layer: RBELinear, x: torch.Tensor, half: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The M = 1 kernels' fp32 product of one row before its rounding to x's dtype (``half``: the calls
    of bf16 / fp16 activations), and the reference's, without bias."""
    tensors, layout = layer.op_args()
    _, signs, block, calls, half_calls = C._plan(tuple(layout), tensors)
    y = C._gemv_one(x.float().numpy().reshape(-1), half_calls if half else calls, signs, block, layout[1])
    return (None if y is None else torch.from_numpy(y)), ops.reference_linear(x.float(), tensors, layout, None)


needs_vnni = pytest.mark.skipif(not C.HAS_VNNI, reason="the int8 form of the sign planes needs AVX-512 VNNI")


@needs_vnni
@pytest.mark.parametrize("planes", [1, 2, 3, 4, 6])
@pytest.mark.parametrize("k, group", [(256, None), (576, None), (1536, 64), (512, 128), (192, 192)])
def test_sign_planes_in_int8_for_half_activations(planes, k, group):
    """Half-precision activations at M = 1: two int8 digits per input and a step per block of at most
    256 put the (rotated) input off by at most ``|x| / 2032``, about a quarter of what rounding it to bf16
    may cost (``|x| / 512``), so each output by at most that times its row's norm; and the error
    over all outputs, relative to those norms, stays under 2e-5, which one digit per input does not
    (``hf_rbe/kernels/NOTES.md``)."""
    spec = LayerSpecV2(tuple(StageV2("b1", group) for _ in range(planes)), rotation=RNG.random() < 0.8)
    layer = _layer(spec, k, RNG.randint(1, 41))
    x = torch.randn(1, k).bfloat16() * 10 ** RNG.uniform(-3, 3)
    tensors, layout = layer.op_args()
    assert all(kernel in C._BITS8.values() for kernel, _ in C._plan(tuple(layout), tensors)[4])
    y, ref = _unrounded(layer, x, half=True)
    scale = layer.dequantize().float().norm(dim=1) * x.float().norm()  # |x . w_i| <= |x| |w_i|
    assert ((y - ref).abs()[0] <= scale / 2032).all(), f"seed {SEED}: {spec} k={k}"
    assert float((y - ref).norm() / scale.norm()) < 2e-5, f"seed {SEED}: {spec} k={k}"
    assert _error(layer, x) < 1e-2, f"seed {SEED}"  # and through linear, rounded to bf16


@needs_vnni
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_the_int8_form_hands_inputs_that_are_not_finite_to_the_fp32_form(bad):
    layer = _layer(LayerSpecV2((StageV2("b1"), StageV2("b1")), rotation=False), 128, 9)
    x = torch.randn(1, 128).bfloat16()
    x[0, 70] = bad
    assert _unrounded(layer, x, half=True)[0] is None
    tensors, layout = layer.op_args()
    y = C.linear(x, tensors, layout, None)
    want = _unrounded(layer, x, half=False)[0].bfloat16()
    assert torch.equal(y.isnan(), want.isnan()) and torch.equal(y.nan_to_num(), want.nan_to_num())


def test_the_int8_digits_of_an_input():
    """Two int8 digits per weight, one step per block: ``d * (128 * high + low)`` is x rounded to
    the step, the sums per group are of those values; a block of zeros is zeros."""
    x = (torch.randn(512) * torch.logspace(-4, 2, 512)).numpy()
    x[128:192] = 0
    high, low = np.empty(512, np.int8), np.empty(512, np.int8)
    d, total = np.empty(4, np.float32), np.empty(2, np.float32)
    assert C._digits(x, 2, 4, high, low, d, total)
    value = np.repeat(d, 128) * (128 * high.astype(np.float32) + low)
    assert np.abs(low).max() <= 64 and np.abs(high).max() <= 127
    assert (np.abs(value - x) <= np.repeat(d, 128) * 0.502).all()  # half a step, and fp32's rounding of d * v
    sums = value.reshape(2, 256)
    assert (np.abs(total - sums.sum(1)) <= 1e-5 * np.abs(sums).sum(1)).all()
    assert (value[128:192] == 0).all()
    x[300] = np.nan
    assert not C._digits(x, 2, 4, high, low, d, total)


@pytest.mark.parametrize("m", [1, 12, C.GEMV_MAX_M + 25])  # the last: decode + a bf16 GEMM
def test_bf16_activations_leading_dims_and_strides(m):
    layer = _layer(LayerSpecV2((StageV2("e8p"), StageV2("vq8"))), 256, 40)
    x = torch.randn(2, m, 512)[..., ::2].bfloat16()  # non-contiguous last dim
    tensors, layout = layer.op_args()
    y = C.linear(x, tensors, layout, layer.bias)
    ref = ops.reference_linear(x.float(), tensors, layout, layer.bias.float())
    assert y.dtype == torch.bfloat16 and y.shape == (2, m, 40)
    assert float((y.float() - ref).norm() / ref.norm()) < 1e-2, f"seed {SEED}"  # bf16 output rounding


@pytest.mark.parametrize("make", ["bf16_strided", "fp32_strided", "grad", "flat", "fp16"])
def test_one_row_in_any_dtype_layout_and_shape(make):
    """Decoding's lean path (one row) takes what the general path takes."""
    layer = _layer(LayerSpecV2((StageV2("e8p"), StageV2("vq4"))), 256, 33)
    base = torch.randn(1, 1, 512)
    x = {"bf16_strided": base[..., ::2].bfloat16(), "fp32_strided": base[..., ::2], "flat": base[0, 0, :256],
         "grad": base[..., :256].clone().requires_grad_(), "fp16": base[..., 1::2].half()}[make]
    tensors, layout = layer.op_args()
    with torch.no_grad():
        y = C.linear(x, tensors, layout, layer.bias)
        ref = ops.reference_linear(x.float(), tensors, layout, layer.bias.float())
    assert y.dtype == x.dtype and y.shape == (*x.shape[:-1], 33)
    tol = TOL if x.dtype == torch.float32 else 1e-2  # half-precision output rounding
    assert float((y.float() - ref).norm() / ref.norm()) < tol, f"seed {SEED}"


@pytest.mark.parametrize("how", ["load_state_dict", "data_copy", "data_swap", "inference"])
def test_a_layer_changed_after_a_call_computes_with_its_new_values(how):
    """The kernel keeps each layer's checked arrays between calls (``_plan``): whatever way the
    codes and scales change (the rotation staying), the next call computes with the new values."""
    spec = LayerSpecV2((StageV2("e8p"), StageV2("vq8")))
    layer = _layer(spec, 256, 24)
    torch.manual_seed(SEED + 1)
    other = RBELinear.from_linear(torch.nn.Linear(256, 24), spec, universal_tables(spec), rotation_seed=SEED)
    names = ("weight", "scale", "residual_weight", "residual_scale")
    x = torch.randn(1, 256)
    with torch.inference_mode(how == "inference"):
        if how == "inference":
            layer = copy.deepcopy(layer)  # inference tensors: no version counter
        before = layer(x)
        if how == "load_state_dict":
            layer.load_state_dict(other.state_dict())
        elif how == "data_swap":
            for name in names:
                getattr(layer, name).data = getattr(other, name).data.clone()
        else:
            with torch.no_grad():
                for name in names:
                    getattr(layer, name).data.copy_(getattr(other, name))
        tensors, layout = other.op_args()
        want = ops.reference_linear(x, tensors, layout, layer.bias)
        assert not torch.allclose(before, want, rtol=1e-2), "the two layers must differ"
        assert torch.allclose(layer(x), want, rtol=1e-4, atol=1e-5), how


def test_the_op_runs_the_kernel_on_cpu(monkeypatch):
    layer = _layer(LayerSpecV2(), 256, 16)
    calls = []
    real = C.linear
    monkeypatch.setattr(C, "linear", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(1, 256)
    y = layer(x)
    assert calls, "hf_rbe::linear on CPU did not reach the numba kernel"
    tensors, layout = layer.op_args()
    assert torch.allclose(y, ops.reference_linear(x, tensors, layout, layer.bias), rtol=1e-4, atol=1e-5)


def test_reference_only_keeps_every_call_off_the_kernel_until_it_ends(monkeypatch):
    layer = _layer(LayerSpecV2(), 256, 16)
    calls = []
    real = C.linear
    monkeypatch.setattr(C, "linear", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(3, 256, requires_grad=True)
    with pytest.raises(RuntimeError, match="inside"), ops.reference_only():
        with torch.no_grad():
            y = layer(x)
        layer(x).sum().backward()  # through the dispatcher and autograd
        raise RuntimeError("inside")
    assert not calls
    tensors, layout = layer.op_args()
    assert torch.equal(y, ops.reference_linear(x.detach(), tensors, layout, layer.bias))
    with torch.no_grad():
        layer(x)
    assert calls, "the kernel must run again once reference_only has ended"


def test_formats_without_a_cpu_kernel_fall_back_to_the_reference(monkeypatch):
    from hf_rbe import RBEConfig

    spec = RBEConfig.from_preset("rbe-3").base_spec()  # format v1: no CPU kernel yet
    layer = RBELinear.from_linear(torch.nn.Linear(256, 8), spec, universal_tables(spec))
    calls = []
    real = ops.reference_linear
    monkeypatch.setattr(ops, "reference_linear", lambda *a: calls.append(1) or real(*a))
    layer(torch.randn(1, 256))
    assert calls and 1 not in dispatch.CPU_KERNELS
