"""Triton kernels that compute ``y = x W^T`` straight from RBE codes (weights never expanded).

One matmul kernel, specialised at compile time on the stored form of a weight term:

- ``MODE_RBE``: packed bitfield codes -> basis vector * gain * group scale, decoded per tile
  in registers (the code layout is constexpr, so each field costs a shift and a mask);
- ``MODE_INT``: a packed int2/int4/int8 residual with group scales;
- ``MODE_FP8``: an e4m3 residual (read as bytes, decoded with integer ops) with group scales.

A layer is a sum of such terms (stage 1 plus its residual); each call adds into the fp32
output, so nothing but ``y`` is ever written. Small batches (``M < 16``) reduce with a
broadcast multiply, larger ones use ``tl.dot`` on tensor cores. ``hadamard_rotate`` applies
the layer's input rotation ``x S H``. Every kernel has a plain PyTorch twin in
``reference.py``; the tests compare them under ``TRITON_INTERPRET=1``.

Nothing here imports transformers or hf_rbe: arguments are raw tensors and ints.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MODE_RBE, MODE_INT, MODE_FP8 = 0, 1, 2


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
              B_CAT: tl.constexpr, B_SUB: tl.constexpr, B_FINE: tl.constexpr):
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
    # MSB -> LSB: amp_fine | cat | sub | idx | sign | deriv | amp
    amp = _field(code, 0, B_AMP)
    deriv = _field(code, B_AMP, B_DERIV)
    sign = _field(code, B_AMP + B_DERIV, B_SIGN)
    idx = _field(code, B_AMP + B_DERIV + B_SIGN, B_IDX)
    sub = _field(code, B_AMP + B_DERIV + B_SIGN + B_IDX, B_SUB)
    cat = _field(code, B_AMP + B_DERIV + B_SIGN + B_IDX + B_SUB, B_CAT)
    fine = _field(code, B_AMP + B_DERIV + B_SIGN + B_IDX + B_SUB + B_CAT, B_FINE)
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
def _fp8_tile(values_ptr, scale_ptr, offs_n, offs_k, mask, K, G, GROUP: tl.constexpr):
    """fp32 tile of an e4m3fn residual read as bytes (sign | 4-bit exponent, bias 7 | 3-bit mantissa)."""
    b = tl.load(values_ptr + offs_n[:, None].to(tl.int64) * K + offs_k[None, :], mask=mask, other=0).to(tl.int32)
    e = (b >> 3) & 15
    m = (b & 7).to(tl.float32)
    normal = (1.0 + m / 8.0) * tl.exp2((e - 7).to(tl.float32))
    val = tl.where(e == 0, m / 8.0 * 0.015625, normal)  # subnormals: m/8 * 2^-6
    val = tl.where((b & 128) != 0, -val, val)
    s = tl.load(scale_ptr + offs_n[:, None].to(tl.int64) * G + (offs_k // GROUP)[None, :], mask=mask, other=0.0)
    return val * s.to(tl.float32)


@triton.jit
def _matmul_kernel(x_ptr, y_ptr, words_ptr, scale_ptr, table_ptr, lut_ptr,
                   M, N, K, W, G, stride_xm, stride_ym,
                   MODE: tl.constexpr, DIM: tl.constexpr, WIDTH: tl.constexpr, VEC_PER_GROUP: tl.constexpr,
                   N_LEVELS: tl.constexpr, B_IDX: tl.constexpr, B_SIGN: tl.constexpr, B_AMP: tl.constexpr,
                   B_DERIV: tl.constexpr, B_CAT: tl.constexpr, B_SUB: tl.constexpr, B_FINE: tl.constexpr,
                   INT_BITS: tl.constexpr, GROUP: tl.constexpr, ACCUMULATE: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, USE_DOT: tl.constexpr):
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
                          VEC_PER_GROUP, N_LEVELS, B_IDX, B_SIGN, B_AMP, B_DERIV, B_CAT, B_SUB, B_FINE)
        elif MODE == 1:
            w = _int_tile(words_ptr, scale_ptr, offs_n, offs_k, mask, W, G, INT_BITS, GROUP)
        else:
            w = _fp8_tile(words_ptr, scale_ptr, offs_n, offs_k, mask, K, G, GROUP)
        x_mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
        x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :], mask=x_mask, other=0.0)
        if USE_DOT:
            acc += tl.dot(x, tl.trans(w.to(x.dtype)))
        else:
            acc += tl.sum(x.to(tl.float32)[:, None, :] * w[None, :, :], axis=2)
    y_ptrs = y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    y_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if ACCUMULATE:
        acc += tl.load(y_ptrs, mask=y_mask, other=0.0)
    tl.store(y_ptrs, acc, mask=y_mask)


def _tiles(m: int) -> tuple[int, int, int, bool]:
    """(BM, BN, BK, use_dot): GEMV-shaped tiles for small M, tensor-core tiles for larger M."""
    if m < 16:
        return max(1, triton.next_power_of_2(m)), 32, 64, False
    return (32 if m <= 32 else 64), 64, 64, True


def _launch(x: torch.Tensor, y: torch.Tensor, accumulate: bool, mode: int, words: torch.Tensor,
            scale: torch.Tensor, table: torch.Tensor | None = None, lut: torch.Tensor | None = None,
            fields: tuple[int, ...] = (0,) * 7, dim: int = 1, int_bits: int = 0, group: int = 1) -> None:
    m, k = x.shape
    n = words.shape[0]
    bm, bn, bk, use_dot = _tiles(m)
    if use_dot:
        bk = max(bk, 16)
    idx_b, sign_b, amp_b, deriv_b, cat_b, sub_b, fine_b = fields
    n_groups = scale.shape[1]
    dummy = scale  # table/lut are unused outside MODE_RBE
    grid = (triton.cdiv(n, bn), triton.cdiv(m, bm))
    _matmul_kernel[grid](
        x, y, words, scale, table if table is not None else dummy, lut if lut is not None else dummy,
        m, n, k, words.shape[1], n_groups, x.stride(0), y.stride(0),
        MODE=mode, DIM=dim, WIDTH=max(1, sum(fields)), VEC_PER_GROUP=max(1, (k // dim) // n_groups),
        N_LEVELS=(lut.shape[1] if lut is not None else 1), B_IDX=idx_b, B_SIGN=sign_b, B_AMP=amp_b,
        B_DERIV=deriv_b, B_CAT=cat_b, B_SUB=sub_b, B_FINE=fine_b, INT_BITS=int_bits, GROUP=group,
        ACCUMULATE=accumulate, BM=bm, BN=bn, BK=bk, USE_DOT=use_dot,
    )


def rbe_stage_matmul(x: torch.Tensor, y: torch.Tensor, words: torch.Tensor, scale: torch.Tensor,
                     table: torch.Tensor, lut: torch.Tensor, fields: tuple[int, ...], dim: int,
                     accumulate: bool) -> None:
    """``y (+)= x @ W^T`` for one RBE stage; ``x`` [M, K] contiguous, ``y`` fp32 [M, N]."""
    _launch(x, y, accumulate, MODE_RBE, words, scale, table.float().contiguous(), lut.float().contiguous(),
            tuple(fields), dim)


def int_residual_matmul(x: torch.Tensor, y: torch.Tensor, words: torch.Tensor, scale: torch.Tensor,
                        bits: int, group: int, accumulate: bool) -> None:
    """``y (+)= x @ R^T`` for a packed int2/int4/int8 residual with group scales."""
    if 32 % bits:
        raise ValueError(f"int residual bits must divide 32, got {bits}")
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


def rbe_linear(x: torch.Tensor, terms: list[dict], signs: torch.Tensor | None, block: int,
               bias: torch.Tensor | None) -> torch.Tensor:
    """A whole RBE layer: rotate ``x`` [M, K], sum the weight terms, add the bias; ``x``'s dtype out.

    Each term is a dict with ``mode`` (``"rbe"``, ``"int"``, ``"fp8"``) and the tensors and
    ints of the matching ``*_matmul`` function.
    """
    if x.dim() != 2:
        raise ValueError("rbe_linear takes a 2-D input [M, K]")
    x = x.contiguous()
    if signs is not None:
        x = hadamard_rotate(x, signs, block)
    y = torch.empty(x.shape[0], terms[0]["words"].shape[0], device=x.device, dtype=torch.float32)
    for i, t in enumerate(terms):
        acc = i > 0
        if t["mode"] == "rbe":
            rbe_stage_matmul(x, y, t["words"], t["scale"], t["table"], t["lut"], t["fields"], t["dim"], acc)
        elif t["mode"] == "int":
            int_residual_matmul(x, y, t["words"], t["scale"], t["bits"], t["group"], acc)
        elif t["mode"] == "fp8":
            fp8_residual_matmul(x, y, t["words"], t["scale"], t["group"], acc)
        else:
            raise ValueError(f"unknown term mode {t['mode']!r}")
    if bias is not None:
        y += bias.float()
    return y.to(x.dtype)


__all__ = ["fp8_residual_matmul", "hadamard_rotate", "int_residual_matmul", "rbe_linear", "rbe_stage_matmul"]
