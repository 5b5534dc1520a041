"""Triton kernel for RBE format v2: a whole layer, ``y = x W^T + b``, in one launch, straight from the codes.

Per program: one ``BN``-row tile of the output and one slice of K (split-K). Each 256-wide K
chunk goes through four steps, all in registers:

1. **rotate** the chunk of ``x`` (signs, then the block Hadamard ``H_B`` with ``B <= 256``): the
   chunk is a 16 x 16 matrix ``X`` per row and ``H`` acts as ``L X R`` with two 16 x 16 block
   Hadamards built from iota (``B >= 16``: ``L = I ⊗ H_{B/16}``, ``R = H_16``; else ``L = I``,
   ``R = I ⊗ H_B``), i.e. two small ``tl.dot``\\ s;
2. **decode** every stage: an e8p code reads its 8-vector from the fp16 table (16 bytes) and its
   8 sign bits from a 128-entry sign-mask table (16 bytes; the implied 8th sign included) and
   XORs them as fp16 bit patterns; vq8 / vq4 codes read a signed 8-vector;
3. **sum the stages** into one fp16 tile, ``c0 + (s1 / s0) c1 + ...`` (per-row or per-chunk scales);
4. **multiply** with ``tl.dot`` (tensor cores, fp32 accumulation), times ``s0`` per row.

Split-K partials go to a workspace; the last program of each N tile (an atomic counter that it
resets) adds them in a fixed order, adds the bias and writes ``y`` in ``x``'s dtype: no memset,
no second launch, deterministic. Kernel-side layouts (fp16 tables, the sign-mask table,
counters) are derived once from the stored tensors and cached (``triton_common.constant``).

Supported: per-row scales, or groups that are multiples of 256; ``in_features`` a multiple of
the Hadamard block (<= 256). Anything else uses the PyTorch reference (``hf_rbe.core.ops``).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

from hf_rbe.core.format_v2 import IDX_OFFSET, PLANES, SIGN_OFFSET, LayerSpecV2, b1_sign_table, e8p_sign_table
from hf_rbe.core.moved import renamed
from hf_rbe.core.op_layout import SIGNS, op_tensor_names
from hf_rbe.core.spec import edit_stamp

from .triton_common import check_device, constant

CHUNK = 256  # K per step: one 16 x 16 Hadamard tile per row
FP16_SAFE_EXP = tl.constexpr(14)  # rows are scaled below 2^14: products of 8 stay finite in fp16
_PLANE_IDS = {name: i for i, name in enumerate(PLANES)}  # constexpr plane ids in the kernel
_E8P, _VQ8, _VQ4 = (_PLANE_IDS[p] for p in ("e8p", "vq8", "vq4"))
_PLANE_IDS["b1"] = _VQ8  # a b1 stage is decoded as vq8 from its 256 sign patterns (``_table16``)
MAX_STAGES = 3
KERNEL_PLANES = ("e8p", "vq8", "vq4", "b1")  # the planes the kernels decode


# ----------------------------------------------------------------------------- jit helpers


@triton.jit
def _had16(BLK: tl.constexpr):
    """16 x 16 block-diagonal Sylvester Hadamard with blocks of BLK (1: identity), orthonormal."""
    i = tl.arange(0, 16)[:, None]
    j = tl.arange(0, 16)[None, :]
    p = i & j & (BLK - 1)
    p = p ^ (p >> 2)
    p = p ^ (p >> 1)
    h = tl.where((i // BLK) == (j // BLK), 1.0 - 2.0 * (p & 1).to(tl.float32), 0.0)
    return h * (1.0 / tl.sqrt(BLK * 1.0))


@triton.jit
def _x_chunk(x_ptr, signs_ptr, offs_m, m_mask, k0, K, stride_xm, BM: tl.constexpr, HB: tl.constexpr,
             ROTATE: tl.constexpr, RANGE: tl.constexpr):
    """``x S H`` for columns k0 .. k0 + 256 of rows ``offs_m``: (fp16 [BM, 256], fp32 [BM] row factors).

    The chunk of each row is a 16 x 16 matrix X and the block Hadamard acts as L X R (L, R from
    ``_had16``); the two products run on the tensor cores with fp32 accumulation. With RANGE
    (bf16 / fp32 inputs), each row is scaled by a power of two that keeps it inside fp16's range
    (exact); the factor multiplies the row's products back in fp32."""
    offs_k = k0 + tl.arange(0, 256)
    k_mask = offs_k < K
    x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :],
                mask=m_mask[:, None] & k_mask[None, :], other=0.0)
    xt = tl.float32 if RANGE else tl.float16  # fp16 inputs rotate in fp16 (fp32 accumulation): half the registers
    x = x.to(xt)
    if ROTATE:
        L: tl.constexpr = HB // 16 if HB >= 16 else 1
        R: tl.constexpr = 16 if HB >= 16 else HB
        x = x * tl.load(signs_ptr + offs_k, mask=k_mask, other=0.0).to(xt)[None, :]
        x = tl.dot(tl.reshape(x, (BM * 16, 16)), _had16(R).to(xt), input_precision="tf32").to(xt)
        x = tl.reshape(tl.permute(tl.reshape(x, (BM, 16, 16)), (0, 2, 1)), (BM * 16, 16))
        x = tl.dot(x, _had16(L).to(xt), input_precision="tf32").to(xt)
        x = tl.reshape(tl.permute(tl.reshape(x, (BM, 16, 16)), (0, 2, 1)), (BM, 256))
    if RANGE:
        big = tl.max(tl.abs(x), axis=1)
        f = tl.exp2(tl.maximum(tl.ceil(tl.log2(tl.maximum(big, 1.0))) - FP16_SAFE_EXP, 0.0))
        return (x / f[:, None]).to(tl.float16), f
    return x.to(tl.float16), tl.full((BM,), 1.0, tl.float32)


@triton.jit
def _codewords(c_ptr, t_ptr, sg_ptr, rows, cols, rmask, v0, V, PLANE: tl.constexpr, E8P: tl.constexpr,
               VQ4: tl.constexpr, IDX_MASK: tl.constexpr, SIGN_OFF: tl.constexpr):
    """Unit-scale codewords [R, 8] (compute type) of code slots (row ``rows``, vector ``v0 + cols``)."""
    j = tl.arange(0, 8)
    base = c_ptr + rows.to(tl.int64) * V
    if PLANE == VQ4:  # two codes per byte, low nibble first
        b = tl.load(base + (v0 + cols) // 2, mask=rmask, other=0).to(tl.int32)
        c = (b >> ((cols & 1) * 4)) & 15
    else:
        c = tl.load(base + v0 + cols, mask=rmask, other=0).to(tl.int32) & 0xFFFF
    if PLANE == E8P:
        t = tl.load(t_ptr + ((c & IDX_MASK) * 8)[:, None] + j[None, :])
        return t * tl.load(sg_ptr + ((c >> SIGN_OFF) * 8)[:, None] + j[None, :])  # the signs as +-1
    else:
        return tl.load(t_ptr + (c * 8)[:, None] + j[None, :])


@triton.jit
def _scale_slots(s_ptr, rows, rmask, G, k0, GROUP: tl.constexpr):
    """fp32 scale of each slot's row for the group holding column k0 (GROUP 0: one per row)."""
    g = 0 if GROUP == 0 else k0 // GROUP
    return tl.load(s_ptr + rows.to(tl.int64) * G + g, mask=rmask, other=1.0).to(tl.float32)


@triton.jit
def _weights(c0_ptr, s0_ptr, t0_ptr, c1_ptr, s1_ptr, t1_ptr, c2_ptr, s2_ptr, t2_ptr, sg_ptr, rows, cols, rmask,
             k0, V0, V1, V2, G0, G1, G2, N_STAGES: tl.constexpr, P0: tl.constexpr, P1: tl.constexpr,
             P2: tl.constexpr, GR0: tl.constexpr, GR1: tl.constexpr, GR2: tl.constexpr, E8P: tl.constexpr,
             VQ4: tl.constexpr, IDX_MASK: tl.constexpr, SIGN_OFF: tl.constexpr):
    """(w [R, 8] = c0 + (s1/s0) c1 + (s2/s0) c2 in the compute type, s0 [R] fp32) for chunk k0."""
    v0 = k0 // 8
    s0 = _scale_slots(s0_ptr, rows, rmask, G0, k0, GR0)
    w = _codewords(c0_ptr, t0_ptr, sg_ptr, rows, cols, rmask, v0, V0, P0, E8P, VQ4, IDX_MASK, SIGN_OFF)
    if N_STAGES > 1:
        r = (_scale_slots(s1_ptr, rows, rmask, G1, k0, GR1) / s0).to(w.dtype)
        w += _codewords(c1_ptr, t1_ptr, sg_ptr, rows, cols, rmask, v0, V1, P1, E8P, VQ4, IDX_MASK,
                        SIGN_OFF) * r[:, None]
    if N_STAGES > 2:
        r = (_scale_slots(s2_ptr, rows, rmask, G2, k0, GR2) / s0).to(w.dtype)
        w += _codewords(c2_ptr, t2_ptr, sg_ptr, rows, cols, rmask, v0, V2, P2, E8P, VQ4, IDX_MASK,
                        SIGN_OFF) * r[:, None]
    return w, s0


@triton.jit
def _finish(acc, y_ptr, bias_ptr, work_ptr, count_ptr, offs_m, offs_n, m_mask, n_mask, stride_ym, pid_n, pid_k,
            pid_m, BM: tl.constexpr, BN: tl.constexpr, SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Write ``acc`` [BM, BN] (+ bias) as y; with split-K the last program of the tile reduces first."""
    y_off = offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :]
    out_mask = m_mask[:, None] & n_mask[None, :]
    tile_off = tl.arange(0, BM)[:, None] * BN + tl.arange(0, BN)[None, :]
    last = True
    if SPLIT > 1:  # publish the partial; the last program of this tile adds them in a fixed order
        tile = (pid_m * tl.num_programs(0) + pid_n).to(tl.int64)
        tl.store(work_ptr + (tile * SPLIT + pid_k) * BM * BN + tile_off, acc)
        last = tl.atomic_add(count_ptr + tile, 1, sem="acq_rel") == SPLIT - 1
        if last:
            acc = tl.zeros((BM, BN), dtype=tl.float32)
            for s in range(SPLIT):
                acc += tl.load(work_ptr + (tile * SPLIT + s) * BM * BN + tile_off)
            tl.store(count_ptr + tile, 0)  # ready for the next call
    if last:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=out_mask)


# ----------------------------------------------------------------------------- the kernels


@triton.jit
def _v2_gemv_kernel(
    # pointers
    x_ptr, y_ptr, bias_ptr, signs_ptr, sg_ptr, work_ptr, count_ptr,
    c0_ptr, s0_ptr, t0_ptr, c1_ptr, s1_ptr, t1_ptr, c2_ptr, s2_ptr, t2_ptr,
    # sizes
    M, N, K, V0, V1, V2, G0, G1, G2, K_SLICE,
    # strides
    stride_xm, stride_ym,
    # meta
    BM: tl.constexpr, BN: tl.constexpr, SPLIT: tl.constexpr, HB: tl.constexpr, ROTATE: tl.constexpr,
    RANGE: tl.constexpr, N_STAGES: tl.constexpr, P0: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr,
    GR0: tl.constexpr, GR1: tl.constexpr, GR2: tl.constexpr, HAS_BIAS: tl.constexpr,
    E8P: tl.constexpr, VQ4: tl.constexpr, IDX_MASK: tl.constexpr, SIGN_OFF: tl.constexpr,
):
    """M = 1: each thread owns code slots (output row, vector) and multiplies their 8 weights with
    the rotated x in packed half precision, one fp32 add per slot; the sum over a row's slots
    happens once, after the K loop. Every tensor is 2-D [slots, 8], so the 8 weights of a code
    stay in one thread (a 3-D form lets Triton spread them over lanes)."""
    pid_n, pid_k, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    m_mask, n_mask = offs_m < M, offs_n < N
    rows = tl.reshape(tl.broadcast_to(offs_n[:, None], (BN, 32)), (BN * 32,))
    cols = tl.reshape(tl.broadcast_to(tl.arange(0, 32)[None, :], (BN, 32)), (BN * 32,))
    rmask = rows < N
    acc = tl.zeros((BN * 32,), dtype=tl.float32)
    k_start = pid_k * K_SLICE
    for k0 in range(k_start, tl.minimum(k_start + K_SLICE, K), 256):
        x, f = _x_chunk(x_ptr, signs_ptr, offs_m, m_mask, k0, K, stride_xm, 1, HB, ROTATE, RANGE)
        w, s0 = _weights(c0_ptr, s0_ptr, t0_ptr, c1_ptr, s1_ptr, t1_ptr, c2_ptr, s2_ptr, t2_ptr, sg_ptr, rows,
                         cols, rmask, k0, V0, V1, V2, G0, G1, G2, N_STAGES, P0, P1, P2, GR0, GR1, GR2, E8P, VQ4,
                         IDX_MASK, SIGN_OFF)
        xs = tl.reshape(tl.broadcast_to(tl.reshape(x, (1, 32, 8)), (BN, 32, 8)), (BN * 32, 8))
        part = tl.sum(w * xs, axis=1).to(tl.float32)  # the 8 products of a slot, in half precision
        if RANGE:
            part = part * tl.sum(f, axis=0)
        if GR0 == 0:
            acc += part
        else:
            acc += part * s0
    out = tl.sum(tl.reshape(acc, (BN, 32)), axis=1)
    if GR0 == 0:
        out = out * _scale_slots(s0_ptr, offs_n, n_mask, G0, 0, 0)
    _finish(out[None, :], y_ptr, bias_ptr, work_ptr, count_ptr, offs_m, offs_n, m_mask, n_mask, stride_ym, pid_n,
            pid_k, pid_m, 1, BN, SPLIT, HAS_BIAS)


@triton.jit
def _v2_tile_kernel(
    # pointers
    x_ptr, y_ptr, bias_ptr, signs_ptr, sg_ptr, work_ptr, count_ptr,
    c0_ptr, s0_ptr, t0_ptr, c1_ptr, s1_ptr, t1_ptr, c2_ptr, s2_ptr, t2_ptr,
    # sizes
    M, N, K, V0, V1, V2, G0, G1, G2, K_SLICE,
    # strides
    stride_xm, stride_ym,
    # meta
    BM: tl.constexpr, BN: tl.constexpr, SPLIT: tl.constexpr, HB: tl.constexpr, ROTATE: tl.constexpr,
    RANGE: tl.constexpr, N_STAGES: tl.constexpr, P0: tl.constexpr, P1: tl.constexpr, P2: tl.constexpr,
    GR0: tl.constexpr, GR1: tl.constexpr, GR2: tl.constexpr, HAS_BIAS: tl.constexpr,
    E8P: tl.constexpr, VQ4: tl.constexpr, IDX_MASK: tl.constexpr, SIGN_OFF: tl.constexpr,
):
    """M > 1: decode a [BN, 256] weight tile once per step, multiply it with the [BM, 256] rotated
    x on the tensor cores (fp32 accumulation)."""
    pid_n, pid_k, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    m_mask, n_mask = offs_m < M, offs_n < N
    rows = tl.reshape(tl.broadcast_to(offs_n[:, None], (BN, 32)), (BN * 32,))
    cols = tl.reshape(tl.broadcast_to(tl.arange(0, 32)[None, :], (BN, 32)), (BN * 32,))
    rmask = rows < N
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    k_start = pid_k * K_SLICE
    for k0 in range(k_start, tl.minimum(k_start + K_SLICE, K), 256):
        x, f = _x_chunk(x_ptr, signs_ptr, offs_m, m_mask, k0, K, stride_xm, BM, HB, ROTATE, RANGE)
        w, s0 = _weights(c0_ptr, s0_ptr, t0_ptr, c1_ptr, s1_ptr, t1_ptr, c2_ptr, s2_ptr, t2_ptr, sg_ptr, rows,
                         cols, rmask, k0, V0, V1, V2, G0, G1, G2, N_STAGES, P0, P1, P2, GR0, GR1, GR2, E8P, VQ4,
                         IDX_MASK, SIGN_OFF)
        w = tl.reshape(w, (BN, 256))
        if GR0 == 0 and not RANGE:
            acc = tl.dot(x, tl.trans(w), acc)
        else:
            part = tl.dot(x, tl.trans(w)) * f[:, None]
            if GR0 != 0:
                part = part * _scale_slots(s0_ptr, offs_n, n_mask, G0, k0, GR0)[None, :]
            acc += part
    if GR0 == 0:
        acc = acc * _scale_slots(s0_ptr, offs_n, n_mask, G0, 0, 0)[None, :]
    _finish(acc, y_ptr, bias_ptr, work_ptr, count_ptr, offs_m, offs_n, m_mask, n_mask, stride_ym, pid_n, pid_k,
            pid_m, BM, BN, SPLIT, HAS_BIAS)


# ----------------------------------------------------------------------------- launcher


@dataclass(frozen=True)
class Tiles:
    """One kernel configuration: which kernel, rows and outputs per program, split of K, warps."""

    kernel: str  # "gemv" (M = 1) or "tile"
    bm: int
    bn: int
    split: int
    num_warps: int
    num_stages: int


#: Per-M configurations, checked statically (``bench/kernel_cost.py``: no spills, instruction ceilings).
GEMV_MAX_M = 1


def tiles(m: int, n: int, k: int, n_sm: int, n_stages: int = 1) -> Tiles:
    """The configuration for an [m, k] x [k, n] product on a GPU with ``n_sm`` SMs: GEMV-shaped at
    M = 1, tensor-core tiles above (16 rows up to M = 16, then 64 rows with 8 warps); fewer
    outputs per program for multi-stage layers (registers); K split so that small-M launches
    still fill the GPU. ``bench/kernel_cost.py`` checks each of these statically (no spills)."""
    bn = 32 if n_stages > 1 else 64
    if m <= GEMV_MAX_M:
        kernel, bm, warps = "gemv", 1, 4
    elif m <= 16:
        kernel, bm, warps = "tile", 16, 4
    else:
        kernel, bm, bn, warps = "tile", 64, 64, 8
    programs = triton.cdiv(n, bn) * triton.cdiv(m, bm)
    split = max(1, min(triton.cdiv(k, CHUNK), (2 * n_sm) // max(programs, 1)))
    return Tiles(kernel, bm, bn, split, warps, num_stages=2)


_TABLES: dict[int, tuple[weakref.ref, int | torch.Size, torch.Tensor]] = {}
__getattr__ = renamed("hf_rbe.kernels.triton_v2", {"sign_table": (
    "hf_rbe.core.format_v2.e8p_sign_table",
    lambda dtype, device="cpu": e8p_sign_table().to(dtype=dtype, device=device))})


def _table16(table: torch.Tensor, plane: str) -> torch.Tensor:
    """The fp16 table the kernels read for a stored one, remade when the table object is another
    one (a freed table's memory can come back under a new table) or was modified in place: a copy,
    or for a b1 plane its one entry times each of the 256 sign patterns (what the vq8 form reads)."""
    hit, stamp = _TABLES.get(id(table)), edit_stamp(table)
    if hit is None or hit[0]() is not table or hit[1] != stamp:
        key = id(table)
        ref = weakref.ref(table, lambda _: _TABLES.pop(key, None))
        if plane == "b1":
            table = b1_sign_table().to(table.device) * table.detach()[0]
        hit = (ref, stamp, table.to(torch.float16).contiguous())
        _TABLES[key] = hit
    return hit[2]


def supports(layout: list[int]) -> bool:
    """Whether the kernels handle this layout (else the PyTorch reference does)."""
    spec = LayerSpecV2.from_layout(layout[3:])
    return len(spec.stages) <= MAX_STAGES and spec.hadamard_block(layout[2]) <= CHUNK and all(
        s.plane in KERNEL_PLANES and (s.group_size is None or s.group_size % CHUNK == 0) for s in spec.stages)


def kernel_args(x2: torch.Tensor, named: dict[str, torch.Tensor], spec: LayerSpecV2, n: int, cfg: Tiles,
                bias: torch.Tensor | None) -> tuple[list, dict[str, Any], tuple[int, int, int], torch.Tensor]:
    """(positional arguments, constexprs, grid, output) of one launch."""
    m, k = x2.shape
    slice_k = triton.cdiv(triton.cdiv(k, CHUNK), cfg.split) * CHUNK
    split = triton.cdiv(k, slice_k)
    grid = (triton.cdiv(n, cfg.bn), split, triton.cdiv(m, cfg.bm))
    y = torch.empty(m, n, device=x2.device, dtype=x2.dtype)
    tiles_n = grid[0] * grid[2]
    work = torch.empty(tiles_n * split * cfg.bm * cfg.bn if split > 1 else 1, device=x2.device, dtype=torch.float32)
    count = constant(("count", x2.device, tiles_n), lambda: torch.zeros(tiles_n, device=x2.device, dtype=torch.int32))
    sg = constant(("e8p signs", x2.device), lambda: e8p_sign_table().to(torch.float16).to(x2.device))
    stage_args, sizes, meta = [], [], {}
    for i in range(MAX_STAGES):
        if i < len(spec.stages):
            prefix, stage = spec.prefixed_stages[i]
            codes, scale, table = named[prefix + "weight"], named[prefix + "scale"], named[prefix + "table"]
            stage_args += [codes, scale, _table16(table, stage.plane)]
            sizes.append((codes.shape[1], scale.shape[1]))
            meta.update({f"P{i}": _PLANE_IDS[stage.plane], f"GR{i}": stage.group_size or 0})
        else:  # unused stage slots: any valid pointer, never read
            stage_args += [sg, sg, sg]
            sizes.append((1, 1))
            meta.update({f"P{i}": 0, f"GR{i}": 0})
    signs = named[SIGNS] if spec.rotation else sg
    args = [x2, y, bias if bias is not None else y, signs, sg, work, count, *stage_args, m, n, k,
            *(v for v, _ in sizes), *(g for _, g in sizes), slice_k, x2.stride(0), y.stride(0)]
    meta.update(BM=cfg.bm, BN=cfg.bn, SPLIT=split, HB=spec.hadamard_block(k), ROTATE=spec.rotation,
                RANGE=x2.dtype != torch.float16, N_STAGES=len(spec.stages),
                HAS_BIAS=bias is not None, E8P=_E8P, VQ4=_VQ4, IDX_MASK=PLANES["e8p"].table_size - 1,
                SIGN_OFF=SIGN_OFFSET - IDX_OFFSET)
    return args, meta, grid, y


KERNELS = {"gemv": _v2_gemv_kernel, "tile": _v2_tile_kernel}


def linear(x: torch.Tensor, tensors: list[torch.Tensor], layout: list[int], bias: torch.Tensor | None,
           n_sm: int | None = None) -> torch.Tensor:
    """``hf_rbe::linear`` of a v2 layer, one launch: ``x`` [..., K] (fp16, bf16 or fp32) -> ``x W^T + b``
    in x's dtype. ``n_sm``: SMs to fill (default: this GPU's)."""
    check_device(x)
    spec = LayerSpecV2.from_layout(layout[3:])
    n, k = layout[1], layout[2]
    named = dict(zip(op_tensor_names(spec), tensors))
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if n_sm is None:
        n_sm = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 4
    cfg = tiles(x2.shape[0], n, k, n_sm, len(spec.stages))
    args, meta, grid, y = kernel_args(x2, named, spec, n, cfg, bias)
    KERNELS[cfg.kernel][grid](*args, **meta, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return y.reshape(*lead, n)


def compile_sm90(cfg: Tiles, spec: LayerSpecV2, x_dtype: torch.dtype = torch.float16) -> Any:
    """The kernel ``linear`` would launch for ``cfg`` and ``spec``, compiled for the H100 without a
    GPU (``kernels/sass_cost.py``), specialised as a real launch is (aligned pointers, sizes
    multiples of 16)."""
    from . import sass_cost

    fn = KERNELS[cfg.kernel]
    tri = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[x_dtype]
    code = {"e8p": "*i16", "vq8": "*u8", "vq4": "*u8", "b1": "*u8"}
    planes = [s.plane for s in spec.stages] + ["vq8"] * (MAX_STAGES - len(spec.stages))
    sig = {"x_ptr": f"*{tri}", "y_ptr": f"*{tri}", "bias_ptr": f"*{tri}", "signs_ptr": "*fp32", "sg_ptr": "*fp16",
           "work_ptr": "*fp32", "count_ptr": "*i32"}
    for i, plane in enumerate(planes):
        sig.update({f"c{i}_ptr": code[plane], f"s{i}_ptr": "*fp16", f"t{i}_ptr": "*fp16"})
    ints = ("M", "N", "K", "V0", "V1", "V2", "G0", "G1", "G2", "K_SLICE", "stride_xm", "stride_ym")
    sig.update({n: "i32" for n in ints})
    sig = {n: sig[n] for n in fn.arg_names if n in sig}
    meta = {"BM": cfg.bm, "BN": cfg.bn, "SPLIT": cfg.split, "HB": CHUNK, "ROTATE": spec.rotation,
            "RANGE": x_dtype != torch.float16, "N_STAGES": len(spec.stages), "HAS_BIAS": True, "E8P": _E8P, "VQ4": _VQ4,
            "IDX_MASK": PLANES["e8p"].table_size - 1, "SIGN_OFF": SIGN_OFFSET - IDX_OFFSET}
    for i, s in enumerate(spec.stages + (spec.stages[0],) * (MAX_STAGES - len(spec.stages))):
        meta.update({f"P{i}": _PLANE_IDS[s.plane], f"GR{i}": 0})
    return sass_cost.compile_sm90(fn, sig, meta, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                                  multiples_of_16=tuple(n for n in ints if n not in ("M",)))
