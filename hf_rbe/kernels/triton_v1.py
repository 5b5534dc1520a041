"""Triton kernels for RBE format v1: ``y = x W^T`` straight from the codes (weights never expanded).

One matmul kernel, specialised at compile time on the stored form of a weight term:

- ``MODE_RBE``: packed bitfield codes -> basis vector * gain * group scale, decoded per tile
  in registers (offsets and widths are constexpr, read from ``core.format.CodeLayout``);
- ``MODE_INT``: a packed int2/int4/int8 residual with group scales;
- ``MODE_FP8``: an e4m3 residual (read as bytes, decoded with integer ops) with group scales.

A layer is a sum of such terms (stage 1 plus its residual); each launch adds into the fp32
output. Small batches (``M < 16``) reduce with a broadcast multiply, larger ones use
``tl.dot`` (exact fp32 products for fp32 inputs: ``input_precision="ieee"``, not TF32).
``hadamard_rotate`` applies the layer's input rotation ``x S H`` first. The PyTorch reference
is the op's (``hf_rbe.core.ops.reference_linear``); tests compare the two under
``TRITON_INTERPRET=1``. Format v1 is kept for its checkpoints; format v2's kernels are faster.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from hf_rbe.core.format import INT_RESIDUAL_BITS, CodeLayout, LayerSpec
from hf_rbe.core.op_layout import op_tensor_names

from .triton_common import check_device

MODE_RBE, MODE_INT, MODE_FP8 = 0, 1, 2
_FP8_EXP_BIAS, _FP8_MANT_BITS = 7, 3  # float8_e4m3fn: sign | 4-bit exponent | 3-bit mantissa
_DOT_MIN_M = 16  # tl.dot needs >= 16 rows


@triton.jit
def _field(code, OFF: tl.constexpr, BITS: tl.constexpr):
    if BITS == 0:
        return code * 0
    else:
        return (code >> OFF) & ((1 << BITS) - 1)


@triton.jit
def _rbe_tile(words_ptr, scale_ptr, table_ptr, lut_ptr, offs_n, offs_k, mask, W, G,
              DIM: tl.constexpr, WIDTH: tl.constexpr, VEC_PER_GROUP: tl.constexpr, N_LEVELS: tl.constexpr,
              B_IDX: tl.constexpr, B_SIGN: tl.constexpr, B_AMP: tl.constexpr, B_DERIV: tl.constexpr,
              B_CAT: tl.constexpr, B_SUB: tl.constexpr, B_FINE: tl.constexpr,
              O_IDX: tl.constexpr, O_SIGN: tl.constexpr, O_AMP: tl.constexpr, O_DERIV: tl.constexpr,
              O_CAT: tl.constexpr, O_SUB: tl.constexpr, O_FINE: tl.constexpr):
    """fp32 [BN, BK] weight tile decoded from the codes of rows ``offs_n``, columns ``offs_k``."""
    vec = offs_k // DIM
    comp = offs_k % DIM
    start = vec * WIDTH  # bit offset of the code in its row's little-endian stream
    word = start // 32
    shift = (start % 32).to(tl.int64)
    row = offs_n[:, None].to(tl.int64) * W
    lo = tl.load(words_ptr + row + word[None, :], mask=mask, other=0).to(tl.int64) & 0xFFFFFFFF
    hi = tl.load(words_ptr + row + word[None, :] + 1, mask=mask & (word[None, :] + 1 < W), other=0)
    hi = hi.to(tl.int64) & 0xFFFFFFFF
    code = ((lo | (hi << 32)) >> shift[None, :]) & ((1 << WIDTH) - 1)
    amp = _field(code, O_AMP, B_AMP)
    deriv = _field(code, O_DERIV, B_DERIV)
    sign = _field(code, O_SIGN, B_SIGN)
    idx = _field(code, O_IDX, B_IDX)
    sub = _field(code, O_SUB, B_SUB)
    cat = _field(code, O_CAT, B_CAT)
    fine = _field(code, O_FINE, B_FINE)
    v = tl.load(table_ptr + idx * DIM + comp[None, :], mask=mask, other=0.0)
    if B_DERIV > 0:  # the derived vector rotates each pair (a, b) -> (-b, a)
        partner = tl.load(table_ptr + idx * DIM + (comp[None, :] ^ 1), mask=mask, other=0.0)
        rotated = tl.where((comp[None, :] % 2) == 0, -partner, partner)
        v = tl.where(deriv == 1, rotated, v)
    curve = (cat << B_SUB) | sub
    level = (amp << B_FINE) | fine
    gain = tl.load(lut_ptr + curve * N_LEVELS + level, mask=mask, other=0.0)
    gain = tl.where(sign == 1, -gain, gain)
    s = tl.load(scale_ptr + offs_n[:, None].to(tl.int64) * G + (vec // VEC_PER_GROUP)[None, :], mask=mask, other=0.0)
    return v * gain * s.to(tl.float32)


@triton.jit
def _int_tile(words_ptr, scale_ptr, offs_n, offs_k, mask, W, G, BITS: tl.constexpr, GROUP: tl.constexpr):
    """fp32 tile of a packed unsigned-offset integer residual: (q - (2^b - 1) / 2) * scale."""
    start = offs_k * BITS  # 32 % BITS == 0: a value never spans two words
    row = offs_n[:, None].to(tl.int64) * W
    word = tl.load(words_ptr + row + (start // 32)[None, :], mask=mask, other=0)
    q = (word >> (start % 32)[None, :]) & ((1 << BITS) - 1)
    s = tl.load(scale_ptr + offs_n[:, None].to(tl.int64) * G + (offs_k // GROUP)[None, :], mask=mask, other=0.0)
    return (q.to(tl.float32) - ((1 << BITS) - 1) / 2) * s.to(tl.float32)


@triton.jit
def _fp8_tile(values_ptr, scale_ptr, offs_n, offs_k, mask, K, G, GROUP: tl.constexpr,
              EXP_BIAS: tl.constexpr, MANT_BITS: tl.constexpr):
    """fp32 tile of an e4m3fn residual read as bytes (sign | exponent | mantissa)."""
    b = tl.load(values_ptr + offs_n[:, None].to(tl.int64) * K + offs_k[None, :], mask=mask, other=0).to(tl.int32)
    e = (b >> MANT_BITS) & 15
    m = (b & ((1 << MANT_BITS) - 1)).to(tl.float32) / (1 << MANT_BITS)
    normal = (1.0 + m) * tl.exp2((e - EXP_BIAS).to(tl.float32))
    val = tl.where(e == 0, m * tl.exp2(1.0 - EXP_BIAS), normal)  # subnormals: m * 2^(1 - bias)
    val = tl.where((b & 128) != 0, -val, val)
    s = tl.load(scale_ptr + offs_n[:, None].to(tl.int64) * G + (offs_k // GROUP)[None, :], mask=mask, other=0.0)
    return val * s.to(tl.float32)


@triton.jit
def _matmul_kernel(x_ptr, y_ptr, words_ptr, scale_ptr, table_ptr, lut_ptr,
                   M, N, K, W, G, stride_xm, stride_ym,
                   MODE: tl.constexpr, DIM: tl.constexpr, WIDTH: tl.constexpr, VEC_PER_GROUP: tl.constexpr,
                   N_LEVELS: tl.constexpr, B_IDX: tl.constexpr, B_SIGN: tl.constexpr, B_AMP: tl.constexpr,
                   B_DERIV: tl.constexpr, B_CAT: tl.constexpr, B_SUB: tl.constexpr, B_FINE: tl.constexpr,
                   O_IDX: tl.constexpr, O_SIGN: tl.constexpr, O_AMP: tl.constexpr, O_DERIV: tl.constexpr,
                   O_CAT: tl.constexpr, O_SUB: tl.constexpr, O_FINE: tl.constexpr,
                   INT_BITS: tl.constexpr, GROUP: tl.constexpr, ACCUMULATE: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, USE_DOT: tl.constexpr,
                   EXP_BIAS: tl.constexpr, MANT_BITS: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        offs_k = k0 + tl.arange(0, BK)
        mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
        if MODE == 0:
            w = _rbe_tile(words_ptr, scale_ptr, table_ptr, lut_ptr, offs_n, offs_k, mask, W, G, DIM, WIDTH,
                          VEC_PER_GROUP, N_LEVELS, B_IDX, B_SIGN, B_AMP, B_DERIV, B_CAT, B_SUB, B_FINE,
                          O_IDX, O_SIGN, O_AMP, O_DERIV, O_CAT, O_SUB, O_FINE)
        elif MODE == 1:
            w = _int_tile(words_ptr, scale_ptr, offs_n, offs_k, mask, W, G, INT_BITS, GROUP)
        else:
            w = _fp8_tile(words_ptr, scale_ptr, offs_n, offs_k, mask, K, G, GROUP, EXP_BIAS, MANT_BITS)
        x_mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
        x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :], mask=x_mask, other=0.0)
        if USE_DOT:
            acc += tl.dot(x, tl.trans(w.to(x.dtype)), input_precision="ieee")
        else:
            acc += tl.sum(x.to(tl.float32)[:, None, :] * w[None, :, :], axis=2)
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    y_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if ACCUMULATE:
        acc += tl.load(y_ptrs, mask=y_mask, other=0.0)
    tl.store(y_ptrs, acc, mask=y_mask)


def _tiles(m: int) -> tuple[int, int, int, bool]:
    """(BM, BN, BK, use_dot): GEMV-shaped tiles for small M, tensor-core tiles for larger M."""
    if m < _DOT_MIN_M:
        return max(1, triton.next_power_of_2(m)), 32, 64, False
    return (32 if m <= 32 else 64), 64, 64, True


def _launch(x: torch.Tensor, y: torch.Tensor, accumulate: bool, mode: int, words: torch.Tensor,
            scale: torch.Tensor, table: torch.Tensor | None = None, lut: torch.Tensor | None = None,
            layout: CodeLayout | None = None, dim: int = 1, int_bits: int = 0, group: int = 1) -> None:
    m, k = x.shape
    n = words.shape[0]
    bm, bn, bk, use_dot = _tiles(m)
    lay = layout or CodeLayout()
    widths = {f"B_{short}": getattr(lay, f) for f, short in _SHORT.items()}
    offsets = {f"O_{short}": lay.offsets[f] for f, short in _SHORT.items()}
    n_groups = scale.shape[1]
    dummy = scale  # table/lut are unused outside MODE_RBE
    grid = (triton.cdiv(n, bn), triton.cdiv(m, bm))
    _matmul_kernel[grid](
        x, y, words, scale, table if table is not None else dummy, lut if lut is not None else dummy,
        m, n, k, words.shape[1], n_groups, x.stride(0), y.stride(0),
        MODE=mode, DIM=dim, WIDTH=lay.width, VEC_PER_GROUP=max(1, (k // dim) // n_groups),
        N_LEVELS=lay.n_levels, **widths, **offsets, INT_BITS=int_bits, GROUP=group,
        ACCUMULATE=accumulate, BM=bm, BN=bn, BK=bk, USE_DOT=use_dot, EXP_BIAS=_FP8_EXP_BIAS, MANT_BITS=_FP8_MANT_BITS,
    )


_SHORT = {"idx": "IDX", "sign": "SIGN", "amp": "AMP", "deriv": "DERIV", "cat": "CAT", "sub": "SUB", "amp_fine": "FINE"}


def rbe_stage_matmul(x: torch.Tensor, y: torch.Tensor, words: torch.Tensor, scale: torch.Tensor,
                     table: torch.Tensor, lut: torch.Tensor, layout: CodeLayout, dim: int, accumulate: bool) -> None:
    """``y (+)= x @ W^T`` for one RBE stage; ``x`` [M, K] contiguous, ``y`` fp32 [M, N]."""
    _launch(x, y, accumulate, MODE_RBE, words, scale, table.float().contiguous(), lut.float().contiguous(),
            layout, dim)


def int_residual_matmul(x: torch.Tensor, y: torch.Tensor, words: torch.Tensor, scale: torch.Tensor,
                        bits: int, group: int, accumulate: bool) -> None:
    """``y (+)= x @ R^T`` for a packed int2/int4/int8 residual with group scales."""
    if bits not in INT_RESIDUAL_BITS.values():
        raise ValueError(f"int residual bits must be one of {sorted(INT_RESIDUAL_BITS.values())}, got {bits}")
    _launch(x, y, accumulate, MODE_INT, words, scale, int_bits=bits, group=group)


def fp8_residual_matmul(x: torch.Tensor, y: torch.Tensor, values: torch.Tensor, scale: torch.Tensor,
                        group: int, accumulate: bool) -> None:
    """``y (+)= x @ R^T`` for an e4m3fn residual [N, K] with group scales."""
    _launch(x, y, accumulate, MODE_FP8, values.view(torch.uint8), scale, group=group)


@triton.jit
def _hadamard_kernel(x_ptr, signs_ptr, y_ptr, K, stride_x, stride_y, B: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    i = tl.arange(0, B)
    x = tl.load(x_ptr + row * stride_x + blk * B + i).to(tl.float32)
    x = x * tl.load(signs_ptr + blk * B + i)
    # Sylvester Hadamard: H[i, j] = (-1)^popcount(i & j) / sqrt(B)
    p = i[:, None] & i[None, :]
    p = p ^ (p >> 8)
    p = p ^ (p >> 4)
    p = p ^ (p >> 2)
    p = p ^ (p >> 1)
    h = 1.0 - 2.0 * (p & 1).to(tl.float32)
    y = tl.sum(x[:, None] * h, axis=0) * (1.0 / tl.sqrt(B * 1.0))
    tl.store(y_ptr + row * stride_y + blk * B + i, y.to(y_ptr.dtype.element_ty))


def hadamard_rotate(x: torch.Tensor, signs: torch.Tensor, block: int) -> torch.Tensor:
    """``x S H`` per block of ``block`` columns, for ``x`` [M, K]; output in ``x``'s dtype."""
    m, k = x.shape
    if block & (block - 1) or k % block:
        raise ValueError(f"block {block} must be a power of two dividing {k}")
    y = torch.empty_like(x)
    _hadamard_kernel[(m, k // block)](x, signs.float().contiguous(), y, k, x.stride(0), y.stride(0), B=block)
    return y


def supports(layout: list[int]) -> bool:
    return True


def linear(x: torch.Tensor, tensors: list[torch.Tensor], layout: list[int], bias: torch.Tensor | None) -> torch.Tensor:
    """A whole v1 layer, ``hf_rbe::linear``: rotate ``x`` [..., K], sum the weight terms into fp32,
    add the bias; x's dtype out."""
    check_device(x)
    spec = LayerSpec.from_layout(layout[3:])
    named = dict(zip(op_tensor_names(spec), tensors))
    lead, k = x.shape[:-1], x.shape[-1]
    x = x.reshape(-1, k).contiguous()
    if spec.rotation:
        x = hadamard_rotate(x, named["signs"], spec.hadamard_block(k))
    y = torch.empty(x.shape[0], layout[1], device=x.device, dtype=torch.float32)
    for i, (prefix, stage) in enumerate(spec.stages):
        rbe_stage_matmul(x, y, named[prefix + "weight"], named[prefix + "scale"], named[prefix + "table"],
                         named[prefix + "lut"], stage.layout, stage.dim, accumulate=i > 0)
    res = spec.residual
    if res.kind == "fp8":
        fp8_residual_matmul(x, y, named["residual_weight"], named["residual_scale"], res.group_size, True)
    elif res.int_bits is not None:
        int_residual_matmul(x, y, named["residual_weight"], named["residual_scale"], res.int_bits, res.group_size, True)
    if bias is not None:
        y += bias.float()
    return y.to(x.dtype).reshape(*lead, layout[1])
