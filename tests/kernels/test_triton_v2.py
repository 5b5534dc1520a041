"""The v2 Triton kernels against the op's PyTorch reference, under TRITON_INTERPRET=1 on the CPU.

Fresh random weights every run (seed printed on failure), outputs of every preset and plane,
fp16 / bf16 / fp32 and strided activations, M across both kernels, K over many 256-chunks and
split-K. The reference runs in fp32 on the very inputs the kernel sees; the kernel multiplies in
fp16, so the tolerance is fp16's (2e-3 relative) and bf16's output rounding (1e-2).
"""

import os
import time

import pytest
import torch

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("without a GPU the kernels run under TRITON_INTERPRET=1 (conftest sets it)", allow_module_level=True)
pytest.importorskip("triton")

from hf_rbe import RBEConfig, RBELinear  # noqa: E402
from hf_rbe.core import ops  # noqa: E402
from hf_rbe.core.format_v2 import LayerSpecV2, StageV2  # noqa: E402
from hf_rbe.core.rbe_codecs import universal_tables  # noqa: E402
from hf_rbe.kernels import triton_v2 as T  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SEED = int(time.time_ns() % 2**31)
TOL = {torch.float16: 2e-3, torch.float32: 2e-3, torch.bfloat16: 1e-2}


def _layer(spec: LayerSpecV2, k: int, n: int, bias: bool = True) -> RBELinear:
    torch.manual_seed(SEED)
    lin = torch.nn.Linear(k, n, bias=bias)
    return RBELinear.from_linear(lin, spec, universal_tables(spec), rotation_seed=SEED).to(DEVICE)


def _check(layer: RBELinear, x: torch.Tensor, n_sm: int = 4) -> float:
    tensors, layout = layer.op_args()
    y = T.linear(x, tensors, layout, layer.bias, n_sm=n_sm)
    ref = ops.reference_linear(x.float(), tensors, layout, None if layer.bias is None else layer.bias.float())
    assert y.dtype == x.dtype and y.shape == ref.shape
    return float((y.float() - ref).norm() / ref.norm())


@pytest.mark.parametrize("preset", ["v2-2", "v2-2.5", "v2-3", "v2-4", "v2-6", "v2-b2", "v2-b3"])
@pytest.mark.parametrize("m", [1, 5, 33])
def test_every_preset_matches_the_reference(preset, m):
    layer = _layer(RBEConfig.from_preset(preset).base_spec(), 512, 72)
    x = torch.randn(m, 512, device=DEVICE).half()
    assert _check(layer, x) < TOL[torch.float16], f"seed {SEED}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("m", [1, 17])
def test_activation_dtypes(dtype, m):
    layer = _layer(RBEConfig.from_preset("v2-3").base_spec(), 256, 40)
    x = (torch.randn(m, 256, device=DEVICE) * 3).to(dtype)
    assert _check(layer, x) < TOL[dtype], f"seed {SEED}"


def test_large_activations_stay_finite_in_bf16_and_fp32():
    layer = _layer(RBEConfig.from_preset("v2-2").base_spec(), 256, 16, bias=False)
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(2, 256, device=DEVICE).to(dtype) * 1e6  # fp16 would overflow without the row scaling
        assert _check(layer, x) < TOL[dtype], f"seed {SEED}"


def test_strided_activations_and_leading_dims():
    layer = _layer(RBEConfig.from_preset("v2-2.5").base_spec(), 256, 24)
    big = torch.randn(3, 2, 512, device=DEVICE).half()
    x = big[..., ::2]  # every other column: a non-contiguous last dim
    tensors, layout = layer.op_args()
    y = T.linear(x, tensors, layout, layer.bias, n_sm=4)
    ref = ops.reference_linear(x.float().contiguous(), tensors, layout, layer.bias.float())
    assert y.shape == (3, 2, 24) and float((y.float() - ref).norm() / ref.norm()) < 2e-3, f"seed {SEED}"


@pytest.mark.parametrize("n_sm", [1, 64])  # one program per tile, or K split over up to 12 programs
def test_many_chunks_and_split_k(n_sm):
    layer = _layer(RBEConfig.from_preset("v2-2").base_spec(), 3072, 32)
    x = torch.randn(1, 3072, device=DEVICE).half()
    assert _check(layer, x, n_sm=n_sm) < 2e-3, f"seed {SEED}"
    assert _check(layer, x, n_sm=n_sm) < 2e-3  # the split-K counters reset themselves


@pytest.mark.parametrize("k,block", [(576, 64), (192, 64), (24, 8), (768, 256)])
def test_hadamard_blocks_below_a_chunk_and_ragged_k(k, block):
    spec = RBEConfig.from_preset("v2-2").base_spec()
    assert spec.hadamard_block(k) == block
    layer = _layer(spec, k, 16)
    assert _check(layer, torch.randn(2, k, device=DEVICE).half()) < 2e-3, f"seed {SEED}"


def test_group_scales_and_no_rotation():
    spec = LayerSpecV2((StageV2("e8p", 256), StageV2("vq8", 256)), rotation=False)
    layer = _layer(spec, 512, 20)
    assert T.supports(layer.layout())
    assert _check(layer, torch.randn(3, 512, device=DEVICE).half()) < 2e-3, f"seed {SEED}"


def test_unsupported_layouts_are_declined():
    spec = LayerSpecV2((StageV2("e8p", 64),))  # groups smaller than a 256-chunk
    assert not T.supports(_layer(spec, 256, 8).layout())


def test_triton_kernels_on_cpu_tensors_say_what_to_do(monkeypatch):
    pytest.importorskip("triton")
    from hf_rbe.kernels import triton_v2

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    layer = RBELinear.from_linear(torch.nn.Linear(64, 16), RBEConfig.from_preset("v2-3").base_spec())
    tensors, layout = layer.op_args()
    with pytest.raises(RuntimeError, match="need CUDA tensors.*numba"):
        triton_v2.linear(torch.randn(2, 64), tensors, layout, None)


def test_fp16_table_copy_of_an_inference_tensor():
    with torch.inference_mode():
        table = torch.randn(16, 8)
    first = T._table16(table, "e8p")
    assert first.dtype == torch.float16 and T._table16(table, "e8p") is first  # kept, not remade
