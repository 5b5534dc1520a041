"""The numba CPU kernel of format v2 against the op's PyTorch reference (fp32, 1e-5 relative).

Fresh random weights and shapes every run (seed printed on failure): every plane as a residual
stage, per-row and grouped scales, with and without rotation (Hadamard blocks below and at the
cap), M on both paths (code-walking GEMV and decode + BLAS). The kernels are compiled once per
session (numba caches them on disk), a few seconds on a cold cache.
"""

import copy
import random
import threading
import time

import numpy as np
import pytest
import torch

nb = pytest.importorskip("numba")

from hf_rbe import RBELinear  # noqa: E402
from hf_rbe.core import ops  # noqa: E402
from hf_rbe.core.format_v2 import LayerSpecV2, StageV2  # noqa: E402
from hf_rbe.core.rbe_codecs import universal_tables  # noqa: E402
from hf_rbe.kernels import cpu_numba as C  # noqa: E402
from hf_rbe.kernels import dispatch  # noqa: E402
from hf_rbe.kernels.cpu_simd import vload, vstore_bf16  # noqa: E402

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


@pytest.mark.parametrize("block", [4, 8, 16, 64, 256])
def test_bf16_rows_rotate_as_the_fp32_transform_rounds(block):
    """Prefill on bf16 activations rotates bf16 rows straight to bf16: bit for bit the fp32 transform
    of the same rows rounded by torch (row counts that leave the last task part full)."""
    k = max(block, 8) * RNG.randint(1, 4)  # rows of whole 8-vectors, as every v2 layer's
    m = RNG.randint(C.GEMV_MAX_M + 1, 70)
    x = (torch.randn(m, k) * 10 ** RNG.uniform(-3, 3)).bfloat16()
    signs = (torch.randint(0, 2, (k,)) * 2 - 1).float().numpy()
    got = torch.from_numpy(C._rotate_many_bf16(x.view(torch.int16).numpy(), signs, block)).view(torch.bfloat16)
    want = torch.from_numpy(C.rotate_rows(x.float(), signs, block)).bfloat16()
    assert torch.equal(got, want), f"seed {SEED}: m={m} k={k}"


def test_the_bf16_store_rounds_ties_to_even_as_torch():
    """``cpu_simd.vstore_bf16``: values exactly half way between two bf16 neighbours (odd and even last
    kept bit, both signs, subnormal, up to the largest finite) and random ones, rounded as torch. (The
    hardware's ``vcvtneps2bf16``, tried instead, flushes subnormals to zero.)"""
    @nb.njit
    def store(x, out):
        for i in range(0, x.shape[0], 8):
            vstore_bf16(out, i, vload(x, i))

    upper = torch.tensor([0x0000, 0x0001, 0x3F80, 0x3F81, 0x7F7E, 0x7F7F, 0x8001, 0xBF80, 0xBF81], dtype=torch.int64)
    ties = ((upper << 16) | 0x8000).to(torch.int32).view(torch.float32)
    x = torch.cat([ties, torch.randn(8 * 64 - len(ties)) * 10 ** RNG.uniform(-30, 30)])
    got = np.empty(len(x), dtype=np.int16)
    store(x.numpy(), got)
    assert torch.equal(torch.from_numpy(got), x.bfloat16().view(torch.int16)), f"seed {SEED}"


@pytest.mark.parametrize("k,group", [(128, 32), (768, 128), (1536, 64)])
@pytest.mark.parametrize("second", [None, "e8p", "vq8", "vq4", "b1"])
def test_the_bf16_decode_rounds_the_fp32_decode_to_nearest_even(second, k, group):
    """What the bf16 GEMM of prefill multiplies: the fp32 decode rounded as torch rounds (a second
    stage is summed by a fused multiply-add, so a rare last-bit tie may round the other way); the
    stages' scale groups of different sizes, so each walks its own."""
    stages = (StageV2("e8p", group),) + (() if second is None else (StageV2(second, 2 * group),))
    layer = _layer(LayerSpecV2(stages, rotation=False), k, 24)
    tensors, layout = layer.op_args()
    got = C._decoded_bf16(C._bf16_decode(C._plan(tuple(layout), tensors)[0], k), 24, k)
    _rounded_alike(got, layer.decode_rotated().bfloat16(), exact=second is None)


def _rounded_alike(got: torch.Tensor, want: torch.Tensor, exact: bool) -> None:
    """``got`` is ``want`` (bf16), or where stages were summed by fused multiply-adds within a last-bit
    tie of it: one bf16 ulp, or where the stages nearly cancel, the fp32 rounding a fused multiply-add
    skips (a fraction 2**-24 of a term; the floor below allows 2**-20 of the largest weight)."""
    if exact:
        assert torch.equal(got, want), f"seed {SEED}"
    else:
        step = (want.float().abs() * 2.0**-7).clamp_min(float(want.float().abs().max()) * 2.0**-20)
        assert ((got.float() - want.float()).abs() <= step).all(), f"seed {SEED}"
        assert (got == want).float().mean() > 0.97, f"seed {SEED}"


@pytest.mark.parametrize("planes", range(1, C.BITS_MAX_PLANES + 1))
def test_the_bf16_decode_of_sign_planes(planes):
    """A run of b1 stages decodes straight to bf16 too (the sign-plane presets' prefill)."""
    layer = _layer(LayerSpecV2(tuple(StageV2("b1", 64) for _ in range(planes)), rotation=False), 256, 21)
    tensors, layout = layer.op_args()
    decode = C._bf16_decode(C._plan(tuple(layout), tensors)[0], 256)
    assert decode is not None
    _rounded_alike(C._decoded_bf16(decode, 21, 256), layer.decode_rotated().bfloat16(), exact=planes == 1)


@pytest.mark.parametrize("plane", ["e8p", "vq8", "vq4", "b1"])
@pytest.mark.parametrize("m", [1, 9])
def test_every_residual_plane(plane, m):
    spec = LayerSpecV2((StageV2("e8p"), StageV2(plane)))
    layer = _layer(spec, 512, 24)
    assert _error(layer, torch.randn(m, 512)) < TOL, f"seed {SEED}"


@pytest.mark.parametrize("stages, groups", [(("e8p",), (32,)), (("e8p", "vq8"), (None, None)),
                                            (("e8p", "vq4"), (32, 32)), (("e8p", "e8p"), (None, None)),
                                            (("e8p", "b1"), (32, 32)), (("e8p", "vq8"), (32, None)),
                                            (("e8p", "vq8", "e8p"), (None, None, 32))])
def test_every_row_count_of_the_few_rows_gemv(stages, groups):
    """1 < M <= GEMV_MAX_M: an e8p stage walks with the next in one pass when their scales are grouped
    alike (else alone, the next by the per-stage GEMV), input rows in blocks of eight (on AVX-512),
    four and two whose repeated rows must not be written, an odd count of output rows, a stage after the pair."""
    spec = LayerSpecV2(tuple(StageV2(p, g) for p, g in zip(stages, groups)))
    layer = _layer(spec, 256, 37)
    tensors, layout = layer.op_args()
    calls = C._few_calls(C._plan(tuple(layout), tensors)[0])
    assert calls[0][0] in C._GEMV2M.values()
    assert len(calls) == len(stages) - (groups[0] == groups[1] if len(stages) > 1 else 0)
    for m in range(2, C.GEMV_MAX_M + 1):
        assert _error(layer, torch.randn(m, 256)) < TOL, f"seed {SEED}: M = {m}"


def test_a_vq4_stage_of_one_row():
    """Two codes a byte: one row of 64 weights holds four bytes, fewer than the eight vectors of a row
    (the run check divided by that count of rows and found none). One output can cancel to near
    zero, so its error is bounded by fp32 rounding of ``|x| |w|``, not relative to itself (that
    failed for about one seed in fifty)."""
    layer = _layer(LayerSpecV2((StageV2("e8p"), StageV2("vq4"))), 64, 1)
    x = torch.randn(1, 64)
    tensors, layout = layer.op_args()
    with torch.no_grad():
        y = C.linear(x, tensors, layout, layer.bias)
        ref = ops.reference_linear(x, tensors, layout, layer.bias)
    bound = TOL * float(layer.dequantize().float().norm() * x.norm())
    assert float((y - ref).abs().max()) <= bound, f"seed {SEED}"


@pytest.mark.parametrize("k, group", [(40, None), (72, 24), (104, 8)])
@pytest.mark.parametrize("m", [1, 3])
def test_odd_row_counts_and_short_groups(k, group, m):
    """The M = 1 GEMV walks two output rows at a time (19 rows: the last alone), over groups of one to five codes."""
    spec = LayerSpecV2((StageV2("e8p", group), StageV2("vq8", group)), rotation=False)
    layer = _layer(spec, k, 19)
    assert _error(layer, torch.randn(m, k)) < TOL, f"seed {SEED}"


@pytest.mark.parametrize("planes", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("k, group", [(256, None), (96, 16), (192, 64), (104, 8), (40, None)])
@pytest.mark.parametrize("m", [1, 3, C.GEMV_MAX_M + 1])
def test_sign_plane_runs(planes, k, group, m):
    """Runs of b1 stages: at M = 1 one lookup pass (AVX-512) per up to four stages where rows and
    groups hold whole 32-bit words (the first three shapes; at M up to ``GEMV_MAX_M`` the same pass
    row by row), else one masked-add pass where they hold whole 16-bit words (96 with groups of 16
    weights), the vq8 form on expanded tables where neither (groups of 8, rows of 40 weights);
    above ``GEMV_MAX_M`` one fused decode of up to four stages; 19 rows: the lookup form's last
    tile of 16 is three rows, the masked adds' last row pair one row."""
    spec = LayerSpecV2(tuple(StageV2("b1", group) for _ in range(planes)), rotation=k % 64 == 0)
    layer = _layer(spec, k, 19)
    assert _error(layer, torch.randn(m, k)) < TOL, f"seed {SEED}"
    tensors, layout = layer.op_args()
    runs = [min(C.BITS_MAX_PLANES, planes - i) for i in range(0, planes, C.BITS_MAX_PLANES)]
    lookups = C.HAS_AVX512 and k % 32 == 0 and (group or k) % 32 == 0
    words = k % 16 == 0 and (group or k) % 16 == 0
    want = ([C._LOOKUP[r] for r in runs] if lookups else [C._BITS[r] for r in runs] if words else
            [C._GEMV[C._B1]] * planes)
    assert [kernel for kernel, _ in C._plan(tuple(layout), tensors)[3]] == want


@pytest.mark.parametrize("entries", [(2.0, 1, 1, 1, 1, 1, 1, 0.5), (0.25,) * 8])
@pytest.mark.parametrize("k", [256, 96, 40])
def test_sign_planes_with_a_table_that_is_not_all_ones(entries, k):
    """A b1 table's one entry scales coordinate ``j`` of every 8-vector: the lookup form folds it
    into its sums, the masked adds (which read no table) leave such a stage to the vq8 form, and
    stages whose entries differ are not walked together."""
    layer = _layer(LayerSpecV2((StageV2("b1"), StageV2("b1"), StageV2("b1")), rotation=False), k, 19)
    tensors, layout = layer.op_args()
    tables = [t for t in tensors if t.shape == (1, 8)]
    with torch.no_grad():
        tables[0].mul_(torch.tensor(entries))
        tables[1].mul_(torch.tensor(entries))
    assert _error(layer, torch.randn(1, k)) < TOL, f"seed {SEED}"
    calls = [kernel for kernel, _ in C._plan(tuple(layout), tensors)[3]]
    assert calls == ([C._LOOKUP[2], C._LOOKUP[1]] if C.HAS_AVX512 and k % 32 == 0 else
                     [C._GEMV[C._B1]] * 2 + [C._BITS[1]] if k % 16 == 0 else [C._GEMV[C._B1]] * 3)


@pytest.mark.parametrize("planes", [1, 2, 3, 4, 6])
@pytest.mark.parametrize("k, group", [(256, None), (576, None), (1536, 64), (512, 128), (192, 192)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sign_plane_lookups_at_random_shapes(planes, k, group, dtype):
    """The lookup form on SmolLM2's widths and odd row counts (a last tile of one to sixteen rows),
    inputs over six decades, fp32 and bf16 activations: every output within fp32 rounding of the
    reference, relative to its row's bound ``|x| |w_i|``."""
    spec = LayerSpecV2(tuple(StageV2("b1", group) for _ in range(planes)), rotation=RNG.random() < 0.8)
    n = RNG.randint(1, 41)
    layer = _layer(spec, k, n)
    x = (torch.randn(1, k) * 10 ** RNG.uniform(-3, 3)).to(dtype)
    tensors, layout = layer.op_args()
    _, signs, block, calls = C._plan(tuple(layout), tensors)
    if C.HAS_AVX512:
        assert all(kernel in C._LOOKUP.values() for kernel, _ in calls)
    y = torch.from_numpy(C._gemv_one(x.float().numpy().reshape(-1), calls, signs, block, n))
    ref = ops.reference_linear(x.float(), tensors, layout, None)
    bound = layer.dequantize().float().norm(dim=1) * x.float().norm()
    assert ((y - ref).abs()[0] <= 1e-5 * bound).all(), f"seed {SEED}: {spec} k={k} n={n}"


def test_a_state_dict_loaded_under_inference_mode_reaches_the_lookup_copy():
    """Tensors made under inference mode have no version counter, so the sign planes' tiled copy
    follows them by identity: ``load_state_dict`` replaces them, and the next call computes with
    the loaded codes (the way docs/usage.md names)."""
    spec = LayerSpecV2((StageV2("b1"), StageV2("b1"), StageV2("b1")), rotation=True)
    a = _layer(spec, 256, 40)
    torch.manual_seed(SEED + 1)
    b = RBELinear.from_linear(torch.nn.Linear(256, 40), spec, universal_tables(spec), rotation_seed=SEED)
    x = torch.randn(1, 256)
    with torch.inference_mode():
        layer = copy.deepcopy(a)
        before = layer(x)
        layer.load_state_dict(b.state_dict())
        got, want = layer(x), b(x)
    assert not torch.allclose(before, want, rtol=1e-2), "the two layers must differ"
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5), f"seed {SEED}"


@pytest.mark.parametrize("stages", [("e8p", "vq8"), ("b1", "b1", "b1"), ("e8p", "vq8", "vq4")])  # the last: no bf16 decode
@pytest.mark.parametrize("m", [1, 12, C.GEMV_MAX_M + 25])  # the last: decode + a bf16 GEMM
def test_bf16_activations_leading_dims_and_strides(m, stages):
    layer = _layer(LayerSpecV2(tuple(StageV2(p) for p in stages)), 256, 40)
    x = torch.randn(2, m, 512)[..., ::2].bfloat16()  # non-contiguous last dim
    tensors, layout = layer.op_args()
    y = C.linear(x, tensors, layout, layer.bias)
    ref = ops.reference_linear(x.float(), tensors, layout, layer.bias.float())
    assert y.dtype == torch.bfloat16 and y.shape == (2, m, 40)
    assert float((y.float() - ref).norm() / ref.norm()) < 1e-2, f"seed {SEED}"  # bf16 output rounding


@pytest.mark.parametrize("stages", [("e8p", "vq8"), ("b1", "b1", "b1"), ("e8p", "vq8", "vq4")])  # the last: no bf16 decode
@pytest.mark.parametrize("m", [1, C.GEMV_MAX_M, C.GEMV_MAX_M + 25])
def test_prefill_dtype_multiplies_many_fp32_rows_as_bf16_ones(m, stages):
    """``prefill_dtype=bfloat16`` on fp32 rows: above the few-row kernels the product is the one a
    bf16 input gets, returned in fp32; at or below them the fp32 product, unchanged."""
    layer = _layer(LayerSpecV2(tuple(StageV2(p) for p in stages)), 256, 40)
    x = torch.randn(1, m, 256)
    tensors, layout = layer.op_args()
    y = C.linear(x, tensors, layout, layer.bias, torch.bfloat16)
    fp32 = C.linear(x, tensors, layout, layer.bias)
    assert y.dtype == torch.float32 and y.shape == (1, m, 40)
    if m <= C.GEMV_MAX_M:
        assert torch.equal(y, fp32), f"seed {SEED}"
        return
    want = C.linear(x.bfloat16(), tensors, layout, None).float() + layer.bias  # the bias added in fp32
    assert not torch.equal(y, fp32), "the bf16 product must differ from the fp32 one"
    assert torch.equal(y, want), f"seed {SEED}"


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
@pytest.mark.parametrize("grad", [True, False])  # without: decoding's row kernel, kept by the layer
def test_a_layer_changed_after_a_call_computes_with_its_new_values(how, grad):
    """The kernel keeps each layer's checked arrays between calls (``_plan``), and a layer its row
    kernel (``PackedLinear``): whatever way the codes and scales change (the rotation staying), the
    next call computes with the new values."""
    spec = LayerSpecV2((StageV2("e8p"), StageV2("vq8")))
    layer = _layer(spec, 256, 24)
    torch.manual_seed(SEED + 1)
    other = RBELinear.from_linear(torch.nn.Linear(256, 24), spec, universal_tables(spec), rotation_seed=SEED)
    names = ("weight", "scale", "residual_weight", "residual_scale")
    x = torch.randn(1, 256)
    with torch.inference_mode(how == "inference"), torch.set_grad_enabled(grad):
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


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_decoding_reaches_the_row_kernel_and_computes_what_the_op_does(monkeypatch, mode):
    with mode():  # a model loaded under inference_mode holds inference tensors
        layer = _layer(LayerSpecV2((StageV2("e8p"), StageV2("vq8"))), 256, 40)
    rows = []
    real = C._one_row
    monkeypatch.setattr(C, "_one_row", lambda *a: rows.append(1) or real(*a))
    tensors, layout = layer.op_args()
    with mode():
        for x in (torch.randn(1, 1, 256), torch.randn(256), torch.randn(1, 256).bfloat16()):
            y = layer(x)
            assert torch.equal(y, C.linear(x, tensors, layout, layer.bias)), f"seed {SEED}"
    assert layer.__dict__["_row"].kernel is not None  # kept: the layer's calls skipped the op
    assert len(rows) == 6  # each call once through the layer, once above


@pytest.mark.skipif(nb.config.NUMBA_NUM_THREADS < 2, reason="numba has one thread: nothing to bound")
def test_the_kernels_run_on_as_many_threads_as_torch():
    layer = _layer(LayerSpecV2((StageV2("e8p"), StageV2("vq8"))), 256, 40)
    seen: dict[str, list[int]] = {}

    def calls(key: str) -> None:
        with torch.no_grad():
            for m in (1, 1, 4, C.GEMV_MAX_M + 1):  # the op's one row, the kept row kernel, the GEMV, decode + BLAS
                layer(torch.randn(m, 256))
                seen.setdefault(key, []).append(nb.get_num_threads())

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        calls("one")
        other = threading.Thread(target=calls, args=("another Python thread",))  # numba's count is per thread
        other.start()
        other.join()
        torch.set_num_threads(2)
        calls("two")
    finally:
        torch.set_num_threads(before)
    assert seen == {"one": [1] * 4, "another Python thread": [1] * 4, "two": [2] * 4}


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
