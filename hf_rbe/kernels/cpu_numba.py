"""CPU kernels for RBE format v2 (numba): ``y = x W^T`` straight from the codes, all cores, SIMD.

Every input row first gets the layer's rotation by a fast Walsh-Hadamard transform (``K log B``
adds, in 8-lane vectors; rows over the threads when there are many, inside the first GEMV call at
M = 1, where a second dispatch costs more than the transform).
Small M (decoding, ``M <= GEMV_MAX_M``): every output row (in parallel, ``prange``) walks its
codes. An e8p code costs one 8-lane load from the 512-entry table, one from the
128-entry +-1 sign table (16 KiB + 4 KiB: both stay in L1), one of x and a multiply and a fused
multiply-add (``cpu_simd``); vq8 / vq4 codes read a signed 8-vector. At M = 1 an e8p stage and
the stage after it run in one pass, two output rows at a time (one x load feeds four
accumulators). For 1 < M <= ``GEMV_MAX_M`` the same pair of stages is summed with its scales per
weight vector, decoded once per two output rows and block of up to eight input rows, one FMA per
input row (other stages: each codeword decoded once per block of four input rows).
A run of b1 planes (a sign per weight) at M = 1 looks its sums up (T-MAC's idea, in fp32, on
AVX-512): per four inputs, a 16-entry table of their sums under every sign pattern, built once per
call; sixteen rows' 4-bit patterns looked up by one ``vpermps`` from codes the layer's plan
reorders into 16-row tiles (a copy the size of the plane). Without AVX-512: ``x . (s * signs) = s *
(sum x - 2 * the sum of the x it negates)``, the second sum one 16-lane add under each 16-bit word
of sign bits. Everywhere else a b1 stage is a vq8 stage whose 256 entries are the sign patterns
times its table's one entry (expanded when the layer's plan is made).
Larger M (prefill): the weight is decoded into a buffer allocated for the call and the product
goes to BLAS (``torch.matmul``): in fp32, or in bf16 when the activations are bf16 (the rotated
input and the decoded weight rounded to bf16, a bf16 model's own precision; the decode writes
bf16 itself, both stages summed before the one rounding). ``linear`` picks by M.

Compiled by numba on first use and cached on disk (``cache=True``): no compiler at install
time. The PyTorch reference of the op (``hf_rbe.core.ops``) is the oracle of the tests.
"""

from __future__ import annotations

import functools
import itertools
import math
import weakref
from collections.abc import Callable

import numba as nb
import numpy as np
import torch

from hf_rbe.core.format_v2 import (
    FORMAT_ID,
    IDX_OFFSET,
    PLANES,
    SIGN_OFFSET,
    VECTOR_DIM,
    LayerSpecV2,
    b1_sign_table,
    e8p_sign_table,
)
from hf_rbe.core.moved import renamed
from hf_rbe.core.op_layout import SIGNS, op_tensor_names
from hf_rbe.core.spec import edit_stamp

from .cpu_simd import (
    HAS_AVX512,
    hload,
    iload16,
    prefetch,
    sload,
    vadd,
    vbroadcast,
    vbroadcast16,
    vfma,
    vhadamard8,
    vload,
    vload16,
    vload_bf16,
    vlookup16,
    vmaskadd16,
    vmul,
    vstore,
    vstore_bf16,
    vsub,
    vsum,
    vsum16,
    vzero,
    vzero16,
)
from .threads import follow_torch

#: Largest M the code-walking GEMV serves; above it decode + BLAS is faster (the crossover
#: ``NOTES.md`` records, on SmolLM2 and 4096x4096 shapes).
GEMV_MAX_M = 12
_E8P_IDX = PLANES["e8p"].table_size - 1  # the idx field's mask
_NIBBLE = PLANES["vq4"].table_size - 1


@nb.njit(inline="always", fastmath=True)
def _butterflies(out: np.ndarray, k: int, block: int) -> None:
    """The stages of a Walsh-Hadamard transform per block of ``block`` columns past the first three
    (pairs eight or more lanes apart), in place on one flat [K] row, in 8-lane vectors."""
    h = 8
    while h < block:
        for start in range(0, k, 2 * h):
            for j in range(start, start + h, 8):
                a = vload(out, j)
                b = vload(out, j + h)
                vstore(out, j, vadd(a, b))
                vstore(out, j + h, vsub(a, b))
        h *= 2


@nb.njit(cache=True, inline="always", fastmath=True)
def _rotate_into(x: np.ndarray, signs: np.ndarray, block: int, out: np.ndarray) -> None:
    """``out = x S H`` per block of ``block`` columns for one flat [K] row: a fast Walsh-Hadamard
    transform (``K log B`` adds, where a matmul by the block costs ``K B`` multiply-adds), its first
    three stages inside each 8-vector's registers. ``out`` may be ``x`` (each place is read before
    it is written)."""
    k = x.shape[0]
    norm = np.float32(1.0 / math.sqrt(block))
    if block < 8:  # a block inside one vector (only a tiny ``rotation_block`` gives one): scalar butterflies
        for i in range(k):
            out[i] = x[i] * signs[i] * norm
        h = 1
        while h < block:
            for start in range(0, k, 2 * h):
                for j in range(start, start + h):
                    a = out[j]
                    b = out[j + h]
                    out[j] = a + b
                    out[j + h] = a - b
            h *= 2
        return
    n = vbroadcast(norm)
    for c in range(0, k, 8):
        vstore(out, c, vhadamard8(vmul(vmul(vload(x, c), vload(signs, c)), n)))
    _butterflies(out, k, block)


# Two functions, not one compiled twice: numba's disk cache keys on the function, not on
# ``parallel``, so one body under two decorators would load either's machine code for both.
@nb.njit(cache=True, fastmath=True)
def _rotate_few(x: np.ndarray, signs: np.ndarray, block: int) -> np.ndarray:
    """``x S H`` of a few rows [M, K] on this thread (a thread launch costs more than they do)."""
    out = np.empty_like(x)
    for r in range(x.shape[0]):
        _rotate_into(x[r], signs, block, out[r])
    return out


@nb.njit(cache=True, parallel=True, fastmath=True)
def _rotate_many(x: np.ndarray, signs: np.ndarray, block: int) -> np.ndarray:
    """``x S H`` of many rows [M, K], rows over the threads."""
    out = np.empty_like(x)
    for r in nb.prange(x.shape[0]):
        _rotate_into(x[r], signs, block, out[r])
    return out


#: Rows per task of ``_rotate_many_bf16``: each task's fp32 row buffer is allocated once.
_BF16_ROWS = 16


@nb.njit(cache=True, parallel=True, fastmath=True)
def _rotate_many_bf16(x: np.ndarray, signs: np.ndarray, block: int) -> np.ndarray:
    """``x S H`` of many bf16 rows (int16 bits [M, K]) in bf16 bits: each row read into an fp32
    buffer, rotated there in place by ``_rotate_into`` and rounded once, as the fp32 transform and
    torch's cast give it, without either pass over all the rows in fp32."""
    m, k = x.shape
    out = np.empty_like(x)
    for task in nb.prange((m + _BF16_ROWS - 1) // _BF16_ROWS):
        row = np.empty(k, dtype=np.float32)
        for r in range(task * _BF16_ROWS, min(m, (task + 1) * _BF16_ROWS)):
            src, dst = x[r], out[r]
            for c in range(0, k, 8):
                vstore(row, c, vload_bf16(src, c))
            _rotate_into(row, signs, block, row)
            for c in range(0, k, 8):
                vstore_bf16(dst, c, vload(row, c))
    return out


@nb.njit(cache=True, inline="always")
def _e8p_vector(codes: np.ndarray, at: int, table: np.ndarray, signs: np.ndarray):  # noqa: ANN202
    c = np.int32(sload(codes, at)) & 0xFFFF  # int16 storage: the code's 16 bits, unsigned
    return vmul(vload(table, ((c >> IDX_OFFSET) & _E8P_IDX) << 3), vload(signs, (c >> SIGN_OFFSET) << 3))


@nb.njit(cache=True, inline="always")
def _codeword(codes: np.ndarray, at: int, table: np.ndarray, signs: np.ndarray, plane: int):  # noqa: ANN202
    """The codeword of vector ``at`` (row * vectors per row + vector) of a flat code plane."""
    if plane == 0:
        return _e8p_vector(codes, at, table, signs)
    if plane == 2:  # two codes a byte, low nibble first
        return vload(table, ((np.int32(sload(codes, at >> 1)) >> ((at & 1) << 2)) & _NIBBLE) << 3)
    return vload(table, np.int32(sload(codes, at)) << 3)


@nb.njit(cache=True, inline="always")
def _row_pair(p: int, n_rows: int, cols: int) -> tuple[int, int, int, int]:
    """(rows, their first codes) of iteration ``p`` of a two-rows-at-a-time walk: an odd last row
    is paired with itself (computed twice, written once)."""
    n0 = 2 * p
    n1 = min(n0 + 1, n_rows - 1)
    return n0, n1, n0 * cols, n1 * cols


@nb.njit(inline="always")
def _one_row_walk(x_in: np.ndarray, rot: np.ndarray, block: int, x: np.ndarray, k: int,
                  width: int, n_scales: int, n_rows: int) -> tuple[int, int, int]:
    """The start of every M = 1 kernel: the input rotated into ``x`` when ``block`` > 0, then
    (scale groups per row, ``width``-weight steps per row, steps per group)."""
    if block > 0:
        _rotate_into(x_in, rot, block, x)
    n_groups = n_scales // n_rows
    cols = k // width
    return n_groups, cols, cols // n_groups


@nb.njit(inline="always")
def _add_pair(out: np.ndarray, n0: int, n1: int, t0: float, t1: float) -> None:
    """The two rows' sums of a ``_row_pair`` iteration added to the output (an unpaired row once)."""
    out[0, n0] += t0
    if n1 != n0:
        out[0, n1] += t1


# Each kernel is made once per plane of the stage it walks (the plane a constant of its closure,
# so numba compiles one loop per plane and caches each): a plane passed as an argument is a branch
# per code that LLVM does not take out of the unrolled loop. Planes: 0 e8p, 1 vq8, 2 vq4.


def _gemv_for(plane: int):  # noqa: ANN202
    @nb.njit(cache=True, parallel=True, fastmath=True)
    def gemv(x_in: np.ndarray, rot: np.ndarray, block: int, x: np.ndarray, k: int, codes: np.ndarray,
             scale: np.ndarray, table: np.ndarray, signs: np.ndarray, out: np.ndarray) -> None:
        """out[0, n] += sum_g scale[n, g] * (x . the stage's codewords of row n in group g), at M = 1.
        ``x`` is the flat [K] rotated input: with ``block`` > 0 this call first writes it, ``x_in``
        rotated by the signs ``rot`` (one dispatch where two were: at M = 1 on a small layer the
        call costs more than the rotation). ``codes`` and ``scale`` (fp16 bits) flat row-major.
        Two output rows per iteration share each x load (an odd last row is computed twice and
        written once)."""
        n_rows = out.shape[1]
        n_groups, cols, per_group = _one_row_walk(x_in, rot, block, x, k, 8, scale.shape[0], n_rows)
        for p in nb.prange((n_rows + 1) // 2):
            n0, n1, r0, r1 = _row_pair(p, n_rows, cols)
            t0 = np.float32(0.0)
            t1 = np.float32(0.0)
            for g in range(n_groups):
                a = vzero()
                b = vzero()
                for v in range(g * per_group, (g + 1) * per_group):
                    xv = vload(x, v << 3)
                    a = vfma(_codeword(codes, r0 + v, table, signs, plane), xv, a)
                    b = vfma(_codeword(codes, r1 + v, table, signs, plane), xv, b)
                t0 += hload(scale, n0 * n_groups + g) * vsum(a)
                t1 += hload(scale, n1 * n_groups + g) * vsum(b)
            _add_pair(out, n0, n1, t0, t1)

    return gemv


def _gemv2_for(plane1: int):  # noqa: ANN202
    @nb.njit(cache=True, parallel=True, fastmath=True)
    def gemv2(x_in: np.ndarray, rot: np.ndarray, block: int, x: np.ndarray, k: int, codes0: np.ndarray,
              scale0: np.ndarray, table0: np.ndarray, codes1: np.ndarray, scale1: np.ndarray, table1: np.ndarray,
              signs: np.ndarray, out: np.ndarray) -> None:
        """The GEMV of an e8p stage and the next (plane ``plane1``, same scale groups) in one pass
        at M = 1: each x load feeds both stages' accumulators of two output rows, and the output
        is written once. The rotation as in ``gemv``."""
        n_rows = out.shape[1]
        n_groups, cols, per_group = _one_row_walk(x_in, rot, block, x, k, 8, scale0.shape[0], n_rows)
        for p in nb.prange((n_rows + 1) // 2):
            n0, n1, r0, r1 = _row_pair(p, n_rows, cols)
            t0 = np.float32(0.0)
            t1 = np.float32(0.0)
            for g in range(n_groups):
                a0 = vzero()
                a1 = vzero()
                b0 = vzero()
                b1 = vzero()
                for v in range(g * per_group, (g + 1) * per_group):
                    xv = vload(x, v << 3)
                    a0 = vfma(_e8p_vector(codes0, r0 + v, table0, signs), xv, a0)
                    a1 = vfma(_codeword(codes1, r0 + v, table1, signs, plane1), xv, a1)
                    b0 = vfma(_e8p_vector(codes0, r1 + v, table0, signs), xv, b0)
                    b1 = vfma(_codeword(codes1, r1 + v, table1, signs, plane1), xv, b1)
                at0 = n0 * n_groups + g
                at1 = n1 * n_groups + g
                t0 += hload(scale0, at0) * vsum(a0) + hload(scale1, at0) * vsum(a1)
                t1 += hload(scale0, at1) * vsum(b0) + hload(scale1, at1) * vsum(b1)
            _add_pair(out, n0, n1, t0, t1)

    return gemv2


@nb.njit(inline="always")
def _sign_terms(planes: int, tg: float, at0: int, at1: int, scale0: np.ndarray, scale1: np.ndarray,
                scale2: np.ndarray, scale3: np.ndarray, fa0, fa1, fa2, fa3, fb0, fb1, fb2, fb3):  # noqa: ANN001, ANN202
    """Two rows' terms of one scale group of ``planes`` b1 stages: per stage ``scale * (sum of x - 2 *
    the sum under its set bits)``, the second sum as the lanes of ``fa*`` (row one) and ``fb*``."""
    t0 = hload(scale0, at0) * (tg - 2 * vsum16(fa0))
    t1 = hload(scale0, at1) * (tg - 2 * vsum16(fb0))
    if planes >= 2:
        t0 += hload(scale1, at0) * (tg - 2 * vsum16(fa1))
        t1 += hload(scale1, at1) * (tg - 2 * vsum16(fb1))
    if planes >= 3:
        t0 += hload(scale2, at0) * (tg - 2 * vsum16(fa2))
        t1 += hload(scale2, at1) * (tg - 2 * vsum16(fb2))
    if planes >= 4:
        t0 += hload(scale3, at0) * (tg - 2 * vsum16(fa3))
        t1 += hload(scale3, at1) * (tg - 2 * vsum16(fb3))
    return t0, t1


def _bits_for(planes: int):  # noqa: ANN202
    @nb.njit(cache=True, parallel=True, fastmath=True)
    def bits(x_in: np.ndarray, rot: np.ndarray, block: int, x: np.ndarray, k: int,
             words0: np.ndarray, scale0: np.ndarray, words1: np.ndarray, scale1: np.ndarray, words2: np.ndarray,
             scale2: np.ndarray, words3: np.ndarray, scale3: np.ndarray, signs: np.ndarray, out: np.ndarray) -> None:
        """The GEMV of ``planes`` (1-4) b1 stages with the same scale groups at M = 1, in one pass,
        from the sign bits as 16-bit words (``words*``, flat row-major; the unused ones repeat the
        first): per row, stage and scale group, ``scale * (sum of x - 2 * sum of x under the set
        bits)``. Two output rows per iteration share each x load. The rotation as in ``gemv``;
        ``signs`` is unused (the M = 1 calls share one form)."""
        n_rows = out.shape[1]
        n_groups, cols, per_group = _one_row_walk(x_in, rot, block, x, k, 16, scale0.shape[0], n_rows)
        total = np.zeros(n_groups, dtype=np.float32)  # sum of x over each group
        for i in range(k):
            total[i // (per_group * 16)] += x[i]
        for p in nb.prange((n_rows + 1) // 2):
            n0, n1, r0, r1 = _row_pair(p, n_rows, cols)
            t0 = np.float32(0.0)
            t1 = np.float32(0.0)
            for g in range(n_groups):
                a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = vzero16()
                for w in range(g * per_group, (g + 1) * per_group):
                    xv = vload16(x, w << 4)
                    a0 = vmaskadd16(a0, xv, words0, r0 + w)
                    b0 = vmaskadd16(b0, xv, words0, r1 + w)
                    if planes >= 2:
                        a1 = vmaskadd16(a1, xv, words1, r0 + w)
                        b1 = vmaskadd16(b1, xv, words1, r1 + w)
                    if planes >= 3:
                        a2 = vmaskadd16(a2, xv, words2, r0 + w)
                        b2 = vmaskadd16(b2, xv, words2, r1 + w)
                    if planes >= 4:
                        a3 = vmaskadd16(a3, xv, words3, r0 + w)
                        b3 = vmaskadd16(b3, xv, words3, r1 + w)
                u0, u1 = _sign_terms(planes, total[g], n0 * n_groups + g, n1 * n_groups + g, scale0, scale1,
                                     scale2, scale3, a0, a1, a2, a3, b0, b1, b2, b3)
                t0 += u0
                t1 += u1
            _add_pair(out, n0, n1, t0, t1)

    return bits


#: Most b1 stages one ``_BITS`` call walks (a longer run takes several calls).
BITS_MAX_PLANES = 4

#: Each four inputs' sums under every sign pattern (bit i of the pattern negating input i), as four
#: 16-lane vectors of +-1: the lookup form's tables are their sums weighted by the inputs.
_PATTERN_SIGNS = np.array([[-1.0 if p >> i & 1 else 1.0 for p in range(16)] for i in range(4)],
                          dtype=np.float32).reshape(-1)


@nb.njit(inline="always")
def _sign_sums(x: np.ndarray, k: int, entry: np.ndarray, pattern_signs: np.ndarray, tables: np.ndarray) -> None:
    """``tables[16 g + p]``: the sum of ``x[4g : 4g + 4]`` times the b1 table's ``entry`` under sign
    pattern ``p``."""
    s0, s1 = vload16(pattern_signs, 0), vload16(pattern_signs, 16)
    s2, s3 = vload16(pattern_signs, 32), vload16(pattern_signs, 48)
    for g in range(k >> 2):
        i = g << 2
        e = i & 7
        v = vfma(vbroadcast16(x[i] * entry[e]), s0, vfma(vbroadcast16(x[i + 1] * entry[e + 1]), s1, vzero16()))
        v = vfma(vbroadcast16(x[i + 2] * entry[e + 2]), s2, v)
        vstore(tables, g << 4, vfma(vbroadcast16(x[i + 3] * entry[e + 3]), s3, v))


@nb.njit(inline="always")
def _look_up_chunk(a, b, tables: np.ndarray, at: int, idx):  # noqa: ANN001, ANN202
    """Two accumulators plus the lookups of one 32-weight chunk of sixteen rows: ``idx`` holds each row's
    eight 4-bit patterns, ``at`` the chunk's first table; two chains halve the add latency."""
    a = vadd(a, vlookup16(tables, at, idx, 0))
    b = vadd(b, vlookup16(tables, at + 16, idx, 4))
    a = vadd(a, vlookup16(tables, at + 32, idx, 8))
    b = vadd(b, vlookup16(tables, at + 48, idx, 12))
    a = vadd(a, vlookup16(tables, at + 64, idx, 16))
    b = vadd(b, vlookup16(tables, at + 80, idx, 20))
    a = vadd(a, vlookup16(tables, at + 96, idx, 24))
    return a, vadd(b, vlookup16(tables, at + 112, idx, 28))


#: How far ahead of its reads the lookup form prefetches each plane's tiles, in 32-bit words (2 KiB):
#: the hardware prefetcher alone left the kernel waiting on memory for about a fifth of a
#: streamed 8B-shaped call (``NOTES.md``).
_AHEAD = 512


def _lookup_for(planes: int):  # noqa: ANN202
    @nb.njit(cache=True, parallel=True, fastmath=True)
    def lookup(x_in: np.ndarray, rot: np.ndarray, block: int, x: np.ndarray, k: int,
               tiles0: np.ndarray, scale0: np.ndarray, tiles1: np.ndarray, scale1: np.ndarray, tiles2: np.ndarray,
               scale2: np.ndarray, tiles3: np.ndarray, scale3: np.ndarray, entry: np.ndarray,
               pattern_signs: np.ndarray, signs: np.ndarray, out: np.ndarray) -> None:
        """The GEMV of ``planes`` (1-4) b1 stages with the same scale groups and table at M = 1, by
        table lookups (AVX-512): ``tiles*`` [N / 16, K / 32, 16] uint32 (each row's 32-bit word of
        sign bits per 32 weights, sixteen rows side by side; rows past N zero), ``scale*`` fp32
        [N / 16, groups, 16] (zero past N), ``entry`` the stages' one table entry. Per 32 weights
        and stage, eight ``vpermps`` into the tables of ``_sign_sums``. The rotation as in ``gemv``;
        ``signs`` is unused (the M = 1 calls share one form)."""
        if block > 0:
            _rotate_into(x_in, rot, block, x)
        chunks = k >> 5
        n_tiles = tiles0.shape[0] // (chunks << 4)
        n_groups = scale0.shape[0] // (n_tiles << 4)
        per_group = chunks // n_groups
        tables = np.empty(k << 2, dtype=np.float32)
        _sign_sums(x, k, entry, pattern_signs, tables)
        row = out[0]
        n = row.shape[0]
        for t in nb.prange(n_tiles):
            acc = vzero16()
            for g in range(n_groups):
                a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = vzero16()
                for c in range(g * per_group, (g + 1) * per_group):
                    at = (t * chunks + c) << 4
                    prefetch(tiles0, at + _AHEAD)
                    a0, b0 = _look_up_chunk(a0, b0, tables, c << 7, iload16(tiles0, at))
                    if planes >= 2:
                        prefetch(tiles1, at + _AHEAD)
                        a1, b1 = _look_up_chunk(a1, b1, tables, c << 7, iload16(tiles1, at))
                    if planes >= 3:
                        prefetch(tiles2, at + _AHEAD)
                        a2, b2 = _look_up_chunk(a2, b2, tables, c << 7, iload16(tiles2, at))
                    if planes >= 4:
                        prefetch(tiles3, at + _AHEAD)
                        a3, b3 = _look_up_chunk(a3, b3, tables, c << 7, iload16(tiles3, at))
                at = (t * n_groups + g) << 4
                acc = vfma(vload16(scale0, at), vadd(a0, b0), acc)
                if planes >= 2:
                    acc = vfma(vload16(scale1, at), vadd(a1, b1), acc)
                if planes >= 3:
                    acc = vfma(vload16(scale2, at), vadd(a2, b2), acc)
                if planes >= 4:
                    acc = vfma(vload16(scale3, at), vadd(a3, b3), acc)
            r = t << 4
            if r + 16 <= n:
                vstore(row, r, vadd(vload16(row, r), acc))
            else:  # the last tile's rows past N are padding
                part = np.empty(16, dtype=np.float32)
                vstore(part, 0, acc)
                for i in range(n - r):
                    row[r + i] += part[i]

    return lookup


@nb.njit(inline="always")
def _scaled(codes0: np.ndarray, table0: np.ndarray, codes1: np.ndarray, table1: np.ndarray, signs: np.ndarray,
            at: int, s0, s1, plane1: int):  # noqa: ANN001, ANN202
    """Weight vector ``at`` of an e8p stage times its scale ``s0``, plus the next stage's (plane
    ``plane1``; -1: none) times ``s1``: the stages summed before any input row is touched."""
    w = vmul(_e8p_vector(codes0, at, table0, signs), s0)
    if plane1 >= 0:
        w = vfma(_codeword(codes1, at, table1, signs, plane1), s1, w)
    return w


@nb.njit(inline="always")
def _group_scales(scale0: np.ndarray, scale1: np.ndarray, at: int, plane1: int):  # noqa: ANN202
    """The two stages' scales of group ``at`` as vectors (the first twice when there is no second)."""
    s0 = vbroadcast(hload(scale0, at))
    return s0, vbroadcast(hload(scale1, at)) if plane1 >= 0 else s0


@nb.njit(inline="always")
def _add_rows(out: np.ndarray, m: int, n0: int, n1: int, a, b) -> None:  # noqa: ANN001
    """Input row ``m``'s sums for the output rows ``n0`` and ``n1`` added to ``out``; nothing for a
    repeated input row (``m`` past the last) and once for a repeated output row."""
    if m < out.shape[0]:
        out[m, n0] += vsum(a)
        if n1 != n0:
            out[m, n1] += vsum(b)


def _rows_block_for(width: int):  # noqa: ANN202
    @nb.njit(inline="always")
    def rows_block(x: np.ndarray, k: int, m0: int, codes0: np.ndarray, scale0: np.ndarray, table0: np.ndarray,
                   codes1: np.ndarray, scale1: np.ndarray, table1: np.ndarray, signs: np.ndarray, plane1: int,
                   pair: tuple[int, int, int, int], n_groups: int, per_group: int, out: np.ndarray) -> None:
        """Input rows ``m0`` to ``m0 + width - 1`` (past the last: the last again, not written) times
        output rows ``pair`` (``_row_pair``) of an e8p stage and the next, added to ``out``: each
        weight vector decoded with its scales once (``_scaled``), then one FMA per input row."""
        n0, n1, r0, r1 = pair
        last = out.shape[0] - 1
        o0, o1, o2, o3 = m0 * k, min(m0 + 1, last) * k, min(m0 + 2, last) * k, min(m0 + 3, last) * k
        o4, o5, o6, o7 = min(m0 + 4, last) * k, min(m0 + 5, last) * k, min(m0 + 6, last) * k, min(m0 + 7, last) * k
        a0, a1, a2, a3, a4, a5, a6, a7 = vzero(), vzero(), vzero(), vzero(), vzero(), vzero(), vzero(), vzero()
        b0, b1, b2, b3, b4, b5, b6, b7 = vzero(), vzero(), vzero(), vzero(), vzero(), vzero(), vzero(), vzero()
        for g in range(n_groups):
            sa0, sa1 = _group_scales(scale0, scale1, n0 * n_groups + g, plane1)
            sb0, sb1 = _group_scales(scale0, scale1, n1 * n_groups + g, plane1)
            for v in range(g * per_group, (g + 1) * per_group):
                wa = _scaled(codes0, table0, codes1, table1, signs, r0 + v, sa0, sa1, plane1)
                wb = _scaled(codes0, table0, codes1, table1, signs, r1 + v, sb0, sb1, plane1)
                o = v << 3
                xv = vload(x, o0 + o)
                a0, b0 = vfma(wa, xv, a0), vfma(wb, xv, b0)
                xv = vload(x, o1 + o)
                a1, b1 = vfma(wa, xv, a1), vfma(wb, xv, b1)
                if width > 2:
                    xv = vload(x, o2 + o)
                    a2, b2 = vfma(wa, xv, a2), vfma(wb, xv, b2)
                    xv = vload(x, o3 + o)
                    a3, b3 = vfma(wa, xv, a3), vfma(wb, xv, b3)
                if width > 4:
                    xv = vload(x, o4 + o)
                    a4, b4 = vfma(wa, xv, a4), vfma(wb, xv, b4)
                    xv = vload(x, o5 + o)
                    a5, b5 = vfma(wa, xv, a5), vfma(wb, xv, b5)
                    xv = vload(x, o6 + o)
                    a6, b6 = vfma(wa, xv, a6), vfma(wb, xv, b6)
                    xv = vload(x, o7 + o)
                    a7, b7 = vfma(wa, xv, a7), vfma(wb, xv, b7)
        _add_rows(out, m0, n0, n1, a0, b0)
        _add_rows(out, m0 + 1, n0, n1, a1, b1)
        if width > 2:
            _add_rows(out, m0 + 2, n0, n1, a2, b2)
            _add_rows(out, m0 + 3, n0, n1, a3, b3)
        if width > 4:
            _add_rows(out, m0 + 4, n0, n1, a4, b4)
            _add_rows(out, m0 + 5, n0, n1, a5, b5)
            _add_rows(out, m0 + 6, n0, n1, a6, b6)
            _add_rows(out, m0 + 7, n0, n1, a7, b7)

    return rows_block


_ROWS2, _ROWS4, _ROWS8 = (_rows_block_for(w) for w in (2, 4, 8))


def _gemv2m_for(plane1: int):  # noqa: ANN202
    @nb.njit(cache=True, parallel=True, fastmath=True)
    def gemv2m(x: np.ndarray, k: int, codes0: np.ndarray, scale0: np.ndarray, table0: np.ndarray,
               codes1: np.ndarray, scale1: np.ndarray, table1: np.ndarray, signs: np.ndarray,
               out: np.ndarray) -> None:
        """``out`` [M, N] += the product of the flat [M * K] rotated rows ``x`` with an e8p stage and
        the next (plane ``plane1``, scales grouped alike; -1: none), for 1 < M <= ``GEMV_MAX_M``.
        Each weight vector is decoded with its scales once per pair of output rows and block of
        input rows, and costs one FMA per input row: summing per stage and scaling per group cost
        an FMA per stage and row. Input rows go in blocks of eight where AVX-512's 32 vector
        registers hold sixteen accumulators, then four (a last block of three repeats its last row),
        then two (a last single row is repeated); repeats are not written."""
        m_rows, n_rows = out.shape
        cols = k // 8
        n_groups = scale0.shape[0] // n_rows
        per_group = cols // n_groups
        eights = m_rows // 8 * 8 if HAS_AVX512 else 0
        fours = eights + (m_rows - eights + 1) // 4 * 4
        for p in nb.prange((n_rows + 1) // 2):
            pair = _row_pair(p, n_rows, cols)
            for m0 in range(0, eights, 8):
                _ROWS8(x, k, m0, codes0, scale0, table0, codes1, scale1, table1, signs, plane1, pair, n_groups,
                       per_group, out)
            for m0 in range(eights, fours, 4):
                _ROWS4(x, k, m0, codes0, scale0, table0, codes1, scale1, table1, signs, plane1, pair, n_groups,
                       per_group, out)
            for m0 in range(fours, m_rows, 2):
                _ROWS2(x, k, m0, codes0, scale0, table0, codes1, scale1, table1, signs, plane1, pair, n_groups,
                       per_group, out)

    return gemv2m


def _gemv4_for(plane: int):  # noqa: ANN202
    @nb.njit(cache=True, parallel=True, fastmath=True)
    def gemv4(x: np.ndarray, k: int, codes: np.ndarray, scale: np.ndarray, table: np.ndarray, signs: np.ndarray,
              out: np.ndarray) -> None:
        """The GEMV for M > 1: input rows in blocks of four, so each codeword is decoded once per
        block and feeds four accumulators (a short block repeats its last row and drops it)."""
        m_rows, n_rows = out.shape
        n_groups = scale.shape[0] // n_rows
        cols = k // 8
        per_group = cols // n_groups
        for n in nb.prange(n_rows):
            row = n * cols
            for m0 in range(0, m_rows, 4):
                b0 = m0 * k
                b1 = min(m0 + 1, m_rows - 1) * k
                b2 = min(m0 + 2, m_rows - 1) * k
                b3 = min(m0 + 3, m_rows - 1) * k
                t0 = t1 = t2 = t3 = np.float32(0.0)
                for g in range(n_groups):
                    a0 = vzero()
                    a1 = vzero()
                    a2 = vzero()
                    a3 = vzero()
                    for v in range(g * per_group, (g + 1) * per_group):
                        w = _codeword(codes, row + v, table, signs, plane)
                        o = v << 3
                        a0 = vfma(w, vload(x, b0 + o), a0)
                        a1 = vfma(w, vload(x, b1 + o), a1)
                        a2 = vfma(w, vload(x, b2 + o), a2)
                        a3 = vfma(w, vload(x, b3 + o), a3)
                    s = hload(scale, n * n_groups + g)
                    t0 += s * vsum(a0)
                    t1 += s * vsum(a1)
                    t2 += s * vsum(a2)
                    t3 += s * vsum(a3)
                out[m0, n] += t0
                if m0 + 1 < m_rows:
                    out[m0 + 1, n] += t1
                if m0 + 2 < m_rows:
                    out[m0 + 2, n] += t2
                if m0 + 3 < m_rows:
                    out[m0 + 3, n] += t3

    return gemv4


def _decode_for(plane: int):  # noqa: ANN202
    @nb.njit(cache=True, parallel=True, fastmath=True)
    def decode(codes: np.ndarray, scale: np.ndarray, table: np.ndarray, signs: np.ndarray, w: np.ndarray, k: int,
               accumulate: bool) -> None:
        """The flat [N * K] buffer ``w`` (+)= the stage's decoded, still rotated weight (fp32)."""
        cols = k // 8
        n_rows = w.shape[0] // k
        n_groups = scale.shape[0] // n_rows
        per_group = cols // n_groups
        for n in nb.prange(n_rows):
            row = n * cols
            for g in range(n_groups):  # groups outside: no division per vector
                s = vbroadcast(hload(scale, n * n_groups + g))
                for v in range(row + g * per_group, row + (g + 1) * per_group):
                    val = vmul(_codeword(codes, v, table, signs, plane), s)
                    if accumulate:
                        val = vadd(val, vload(w, v << 3))
                    vstore(w, v << 3, val)

    return decode


def _decode_bf16_for(plane1: int):  # noqa: ANN202
    @nb.njit(cache=True, parallel=True, fastmath=True)
    def decode_bf16(codes0: np.ndarray, scale0: np.ndarray, table0: np.ndarray, codes1: np.ndarray,
                    scale1: np.ndarray, table1: np.ndarray, signs: np.ndarray, w: np.ndarray, k: int) -> None:
        """The flat [N * K] bf16 bits ``w`` = the decoded, still rotated weight of an e8p stage plus
        the next (plane ``plane1``; -1: none), summed in fp32 and rounded once: the weight a bf16
        GEMM takes, without an fp32 buffer and a conversion pass."""
        cols = k // 8
        n_rows = w.shape[0] // k
        groups0 = scale0.shape[0] // n_rows
        groups1 = scale1.shape[0] // n_rows if plane1 >= 0 else 1
        per0 = cols // groups0
        per1 = cols // groups1
        for n in nb.prange(n_rows):
            row = n * cols
            # each stage's scale group by a counter: a division per vector cost more than its decode
            at0, left0, at1, left1 = n * groups0, per0, n * groups1, per1
            s0 = vbroadcast(hload(scale0, at0))
            s1 = vbroadcast(hload(scale1, at1))
            for v in range(row, row + cols):
                if left0 == 0:
                    at0, left0 = at0 + 1, per0
                    s0 = vbroadcast(hload(scale0, at0))
                val = vmul(_e8p_vector(codes0, v, table0, signs), s0)
                left0 -= 1
                if plane1 >= 0:
                    if left1 == 0:
                        at1, left1 = at1 + 1, per1
                        s1 = vbroadcast(hload(scale1, at1))
                    val = vfma(_codeword(codes1, v, table1, signs, plane1), s1, val)
                    left1 -= 1
                vstore_bf16(w, v << 3, val)

    return decode_bf16


def _decode_signs_for(planes: int, bf16: bool):  # noqa: ANN202
    @nb.njit(cache=True, parallel=True, fastmath=True)
    def decode_signs(codes0: np.ndarray, scale0: np.ndarray, codes1: np.ndarray, scale1: np.ndarray,
                     codes2: np.ndarray, scale2: np.ndarray, codes3: np.ndarray, scale3: np.ndarray,
                     table: np.ndarray, w: np.ndarray, k: int) -> None:
        """The flat [N * K] ``w`` = the decoded, still rotated weight of a run of ``planes`` (1-4) b1
        stages with the same scale groups and expanded ``table`` (a byte of signs per 8 weights),
        summed in fp32 and written once: fp32, or with ``bf16`` its bf16 bits rounded once, as
        ``decode_bf16`` does for e8p."""
        cols = k // 8
        n_rows = w.shape[0] // k
        n_groups = scale0.shape[0] // n_rows
        per_group = cols // n_groups
        for n in nb.prange(n_rows):
            for g in range(n_groups):
                at = n * n_groups + g
                s0, s1 = vbroadcast(hload(scale0, at)), vbroadcast(hload(scale1, at))
                s2, s3 = vbroadcast(hload(scale2, at)), vbroadcast(hload(scale3, at))
                for v in range(n * cols + g * per_group, n * cols + (g + 1) * per_group):
                    val = vmul(_codeword(codes0, v, table, table, 1), s0)
                    if planes >= 2:
                        val = vfma(_codeword(codes1, v, table, table, 1), s1, val)
                    if planes >= 3:
                        val = vfma(_codeword(codes2, v, table, table, 1), s2, val)
                    if planes >= 4:
                        val = vfma(_codeword(codes3, v, table, table, 1), s3, val)
                    if bf16:
                        vstore_bf16(w, v << 3, val)
                    else:
                        vstore(w, v << 3, val)

    return decode_signs


_PLANE_IDS = {"e8p": 0, "vq8": 1, "vq4": 2, "b1": 3}
_B1 = _PLANE_IDS["b1"]
_FORMS = (0, 1, 2, 1)  # the kernel form of each plane id: b1 walks as vq8, on its expanded table


def _by_plane(make, extra: tuple[int, ...] = ()) -> dict[int, object]:  # noqa: ANN001
    """``make(form)`` for every plane id (and ``extra`` forms, as themselves), each form made once."""
    made = {f: make(f) for f in (*sorted(set(_FORMS)), *extra)}
    return {**{p: made[f] for p, f in enumerate(_FORMS)}, **{f: made[f] for f in extra}}


_GEMV = _by_plane(_gemv_for)
_GEMV2 = _by_plane(_gemv2_for)
_GEMV2M = _by_plane(_gemv2m_for, extra=(-1,))
_GEMV4 = _by_plane(_gemv4_for)
_DECODE = _by_plane(_decode_for)
_DECODE_BF16 = _by_plane(_decode_bf16_for, extra=(-1,))
#: (planes, bf16) -> the fused decode of a run of b1 stages
_DECODE_SIGNS = {(p, h): _decode_signs_for(p, h) for p in range(1, BITS_MAX_PLANES + 1) for h in (False, True)}
_BITS = {p: _bits_for(p) for p in range(1, BITS_MAX_PLANES + 1)}
_LOOKUP = {p: _lookup_for(p) for p in range(1, BITS_MAX_PLANES + 1)} if HAS_AVX512 else {}
_SIGNS = e8p_sign_table().reshape(-1).clone().numpy()  # torch allocates 64-byte aligned: no row splits a line
__getattr__ = renamed("hf_rbe.kernels.cpu_numba", {
    "sign_table": ("hf_rbe.core.format_v2.e8p_sign_table", lambda: e8p_sign_table().numpy().copy())})
def supports(layout: list[int]) -> bool:
    return layout[0] == FORMAT_ID


@functools.lru_cache(maxsize=256)
def _parse(layout: tuple[int, ...]) -> tuple[LayerSpecV2, tuple[str, ...], tuple]:
    """The spec, the op's tensor names and per stage (plane id, {name: (shape, dtype)} of its
    codes, scales and table): computed once per layout."""
    spec = LayerSpecV2.from_layout(list(layout[3:]))
    n, k = layout[1], layout[2]
    stages = []
    for prefix, stage in spec.prefixed_stages:
        want = [(name, torch.Size(ts.shape), ts.dtype) for name, ts in stage.tensors(n, k, prefix).items()]
        want.append((prefix + "table", torch.Size((stage.kind.table_size, VECTOR_DIM)), torch.float32))
        stages.append((prefix, _PLANE_IDS[stage.plane], tuple(want)))
    return spec, op_tensor_names(spec), tuple(stages)


def _stages(stages: tuple, named: dict[str, torch.Tensor]) -> list[tuple]:
    """Per stage: (flat codes, flat fp16 scales as int16 bits, flat fp32 table, plane id), every
    shape and dtype checked: the kernels index without bounds checks, so nothing unchecked may
    reach them. Views where the tensors are contiguous: nothing is copied per call."""
    out = []
    for prefix, plane, want in stages:
        for name, shape, dtype in want:
            t = named[name]
            if t.shape != shape or t.dtype != dtype:
                raise ValueError(f"hf_rbe::linear: {name} is {t.dtype}{list(t.shape)}, the layout needs "
                                 f"{dtype}{list(shape)}")
        table = named[prefix + "table"]
        flat = _b1_table(tuple(table[0].tolist())) if plane == _B1 else table.numpy(force=True).reshape(-1)
        out.append((named[prefix + "weight"].numpy(force=True).reshape(-1),
                    named[prefix + "scale"].detach().view(torch.int16).numpy().reshape(-1), flat, plane))
    return out


@functools.lru_cache(maxsize=64)
def _b1_table(entry: tuple[float, ...]) -> np.ndarray:
    """The flat [256 * 8] table the vq8 form reads for a b1 stage: every sign pattern times its
    table's one entry (one per distinct entry: layers that share a table share this)."""
    return (b1_sign_table() * torch.tensor(entry, dtype=torch.float32)).reshape(-1).numpy()


#: The checked arrays of each layer's last call, by the id of its first tensor (dropped when that
#: tensor dies): the checks and conversions cost more than a small layer's product. A plan is
#: reused while every tensor is the same object at the same address and version (shape, for
#: inference tensors, as every cache of ``edit_stamp`` reads it). It holds views, and for the
#: lookup form a 16-row tiling of each b1 plane; a layer with a tensor that would need a copy
#: gets no plan.
_PLANS: dict[int, tuple] = {}


def _plan(key: tuple[int, ...], tensors: list[torch.Tensor]) -> tuple[tuple, np.ndarray | None, int, tuple]:
    """(stages as ``_stages`` gives them, fp32 rotation signs or ``None``, Hadamard block, the
    kernel calls of M = 1 as ``_one_calls`` gives them) of a call."""
    stamp = tuple((id(t), t.data_ptr(), edit_stamp(t)) for t in tensors)
    hit = _PLANS.get(id(tensors[0]))
    if hit is not None and hit[0] == key and hit[1] == stamp:
        return hit[2]
    spec, names, stage_specs = _parse(key)
    n, k = key[1], key[2]
    named = dict(zip(names, tensors))
    signs, block = None, 0
    if spec.rotation:
        if named[SIGNS].shape != (k,):
            raise ValueError(f"hf_rbe::linear: {SIGNS} has shape {list(named[SIGNS].shape)}, the layout needs [{k}]")
        signs, block = named[SIGNS].detach().float().numpy(), spec.hadamard_block(k)
    stages = tuple(_stages(stage_specs, named))
    plan = (stages, signs, block, _one_calls(stages, n, k))
    if all(t.is_contiguous() for t in tensors) and (signs is None or named[SIGNS].dtype == torch.float32):
        if id(tensors[0]) not in _PLANS:
            weakref.finalize(tensors[0], _PLANS.pop, id(tensors[0]), None)
        _PLANS[id(tensors[0])] = (key, stamp, plan)
    return plan


def rotation(tensors: list[torch.Tensor], layout: list[int]) -> tuple[np.ndarray | None, int]:
    """(fp32 rotation signs or ``None``, Hadamard block) of a layer, as :func:`linear` reads them."""
    _, signs, block, _ = _plan(tuple(layout), tensors)
    return signs, block


def rotate_rows(x2: torch.Tensor, signs: np.ndarray, block: int) -> np.ndarray:
    """The rotated input rows the kernels take (fp32 [M, K] contiguous in)."""
    return (_rotate_few if x2.shape[0] <= GEMV_MAX_M else _rotate_many)(x2.numpy(), signs, block)


_NO_SIGNS = np.ones(0, dtype=np.float32)


def _walkable(stage: tuple, k: int, width: int) -> bool:
    """Whether a stage is b1 with rows and scale groups of whole ``width``-weight words."""
    codes, scale, _, plane = stage
    if plane != _B1 or k % width:
        return False
    return (k // width) % (scale.shape[0] // (codes.shape[0] // (k // 8))) == 0


def _entry(stage: tuple) -> np.ndarray:
    """A b1 stage's one table entry: the first row of its expanded table (the pattern of no signs)."""
    return stage[2][:8]


def _b1_run(stages: tuple, i: int, k: int, width: int) -> list[tuple]:
    """The run of b1 stages from ``i`` one bits or lookup call walks at ``width``: up to
    ``BITS_MAX_PLANES``, scales grouped alike, one table entry; empty where stage ``i`` is not
    walkable so."""
    run: list[tuple] = []
    while i + len(run) < len(stages) and len(run) < BITS_MAX_PLANES:
        stage = stages[i + len(run)]
        if not _walkable(stage, k, width) or run and (stage[1].shape != run[0][1].shape or
                                                      not np.array_equal(_entry(stage), _entry(run[0]))):
            break
        run.append(stage)
    return run


def _tiles(stage: tuple, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """A b1 stage as the lookup form reads it: (sign bits [N / 16, K / 32, 16] uint32, fp32 scales
    [N / 16, groups, 16]), N rounded up to whole tiles with zeros."""
    codes, scale, _, _ = stage
    rows = -(-n // 16) * 16
    words = np.zeros((rows, k // 32), dtype=np.uint32)
    words[:n] = codes.reshape(n, k // 8).view(np.uint32)
    fp32 = np.zeros((rows, scale.shape[0] // n), dtype=np.float32)
    fp32[:n] = scale.view(np.float16).reshape(n, -1)
    return (np.ascontiguousarray(words.reshape(rows // 16, 16, -1).transpose(0, 2, 1)).reshape(-1),
            np.ascontiguousarray(fp32.reshape(rows // 16, 16, -1).transpose(0, 2, 1)).reshape(-1))


def _bits_walk(stage: tuple) -> bool:
    """Whether the bits kernel walks a b1 stage: its table's entry all ones (the kernel reads no
    table) and its codes aligned as 16-bit words."""
    return bool((_entry(stage) == 1).all()) and stage[0].ctypes.data % 2 == 0


def _padded(pairs: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, ...]:
    """A run's (codes, scales) per stage, flat, padded to ``BITS_MAX_PLANES`` stages by repeating the
    first (the kernels' unused arguments)."""
    return tuple(a for pair in pairs + [pairs[0]] * (BITS_MAX_PLANES - len(pairs)) for a in pair)


def _one_calls(stages: tuple, n: int, k: int) -> tuple[tuple, ...]:
    """The kernel calls of M = 1, as (kernel, its stage arguments): an e8p stage and the next in
    one ``_GEMV2`` call where their scales are grouped alike; a run of b1 stages with scales grouped
    alike and one table entry by one lookup call where the CPU has AVX-512 (up to
    ``BITS_MAX_PLANES``), else by one bits call where that entry is all ones; any other stage alone."""
    calls, i = [], 0
    while i < len(stages):
        run = _b1_run(stages, i, k, 32) if HAS_AVX512 else []
        if run:
            args = _padded([_tiles(stage, n, k) for stage in run])
            calls.append((_LOOKUP[len(run)], (*args, _entry(run[0]).copy(), _PATTERN_SIGNS)))
            i += len(run)
            continue
        run = list(itertools.takewhile(_bits_walk, _b1_run(stages, i, k, 16)))
        if run:
            calls.append((_BITS[len(run)], _padded([(stage[0].view(np.uint16), stage[1]) for stage in run])))
            i += len(run)
        elif i + 1 < len(stages) and stages[i][3] == 0 and stages[i][1].shape == stages[i + 1][1].shape:
            (c0, s0, t0, _), (c1, s1, t1, p1) = stages[i:i + 2]
            calls.append((_GEMV2[p1], (c0, s0, t0, c1, s1, t1)))
            i += 2
        else:
            codes, scale, table, plane = stages[i]
            calls.append((_GEMV[plane], (codes, scale, table)))
            i += 1
    return tuple(calls)


def _few_calls(stages: tuple) -> list[tuple]:
    """The kernel calls of 1 < M <= ``GEMV_MAX_M``, as (kernel, its stage arguments): an e8p stage
    with the next where their scales are grouped alike, or alone, in one ``_GEMV2M`` call; any
    other stage by ``_GEMV4``."""
    calls, i = [], 0
    while i < len(stages):
        codes, scale, table, plane = stages[i]
        if plane != 0:
            calls.append((_GEMV4[plane], (codes, scale, table)))
            i += 1
        elif i + 1 < len(stages) and stages[i + 1][1].shape == scale.shape:
            c1, s1, t1, p1 = stages[i + 1]
            calls.append((_GEMV2M[p1], (codes, scale, table, c1, s1, t1)))
            i += 2
        else:
            calls.append((_GEMV2M[-1], (codes, scale, table, codes, scale, table)))
            i += 1
    return calls


def _gemv_one(x: np.ndarray, calls: tuple, signs: np.ndarray | None, block: int, n: int) -> np.ndarray:
    """[1, N] output of one flat [K] input row (decoding). The first kernel call also rotates the
    row, the later ones read what it wrote."""
    k = x.shape[0]
    out = np.zeros((1, n), dtype=np.float32)
    if signs is None:
        xr, signs, block = x, _NO_SIGNS, 0
    else:
        xr = np.empty(k, dtype=np.float32)
    for kernel, args in calls:
        kernel(x, signs, block, xr, k, *args, _SIGNS, out)
        block = 0  # rotated once
    return out


def _bf16_decode(stages: tuple, k: int) -> tuple | None:
    """(kernel, its stage arguments) that decodes a layer's weight straight to bf16: one e8p stage
    or an e8p stage and the next, or a run of b1 stages (all of the layer's); ``None`` for others."""
    if len(stages) <= 2 and stages[0][3] == 0:
        c0, s0, t0, _ = stages[0]
        c1, s1, t1, p1 = stages[1] if len(stages) == 2 else (c0, s0, t0, -1)
        return _DECODE_BF16[p1], (c0, s0, t0, c1, s1, t1, _SIGNS)
    return _signs_decode(stages, k, True)


def _signs_decode(stages: tuple, k: int, bf16: bool) -> tuple | None:
    """(kernel, its stage arguments) of the fused decode of a layer whose stages are one run of b1
    stages (in fp32, or with ``bf16`` in bf16); ``None`` for others."""
    run = _b1_run(stages, 0, k, 8)
    if len(run) != len(stages):
        return None
    return _DECODE_SIGNS[len(run), bf16], (*_padded([stage[:2] for stage in run]), run[0][2])


def _decoded_bf16(decode: tuple, n: int, k: int) -> torch.Tensor:
    """The bf16 [N, K] rotated weight by a ``_bf16_decode`` call."""
    w = np.empty(n * k, dtype=np.int16)
    kernel, args = decode
    kernel(*args, w, k)
    return torch.from_numpy(w).view(torch.bfloat16).view(n, k)


def _one_row(x: torch.Tensor, bias: torch.Tensor | None, calls: tuple, signs: np.ndarray | None, block: int,
             n: int, k: int) -> torch.Tensor:
    """``linear`` of one row (decoding): as few tensor operations around the kernels as can be."""
    follow_torch()
    row = x.detach() if x.requires_grad else x
    if row.dtype != torch.float32 or not row.is_contiguous():
        row = row.float().contiguous()
    y = torch.from_numpy(_gemv_one(row.numpy().reshape(k), calls, signs, block, n))
    return y.view(*x.shape[:-1], n) if bias is None and x.dtype == torch.float32 else _finish(y, x, bias)


def row_kernel(tensors: list[torch.Tensor], layout: list[int]) -> Callable[[torch.Tensor, torch.Tensor | None],
                                                                            torch.Tensor]:
    """``linear`` of one row for this layer, its plan made now (``core.ops.row_kernel``): the caller
    keeps it while the tensors hold what they hold now, and skips ``_plan``'s checks per call."""
    _, signs, block, calls = _plan(tuple(layout), tensors)
    n, k = layout[1], layout[2]
    return lambda x, bias: _one_row(x, bias, calls, signs, block, n, k)


def linear(x: torch.Tensor, tensors: list[torch.Tensor], layout: list[int], bias: torch.Tensor | None,
           prefill_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``hf_rbe::linear`` of a v2 layer on CPU tensors: ``x`` [..., K] -> ``x W^T + b`` in x's dtype.
    Above ``GEMV_MAX_M`` rows the product is a bf16 GEMM when x is bf16 or ``prefill_dtype`` is
    (x rounded to bf16 first); other dtypes it leaves to x's."""
    n, k = layout[1], layout[2]
    if x.shape[-1] != k:
        raise ValueError(f"hf_rbe::linear: x has {x.shape[-1]} features, the layer takes {k}")
    stages, signs, block, calls = _plan(tuple(layout), tensors)
    if x.numel() == k:
        return _one_row(x, bias, calls, signs, block, n, k)
    m = x.numel() // k
    follow_torch()
    half = m > GEMV_MAX_M and torch.bfloat16 in (x.dtype, prefill_dtype)
    xm = x.detach().reshape(m, k)
    if half:  # a bf16 product, as if x were bf16; _finish returns x's dtype
        xm = xm.to(torch.bfloat16)
        decode = _bf16_decode(stages, k)
        if decode is not None:
            xb = xm.contiguous()
            if signs is not None:
                bits = _rotate_many_bf16(xb.view(torch.int16).numpy(), signs, block)
                xb = torch.from_numpy(bits).view(torch.bfloat16)
            return _finish(xb @ _decoded_bf16(decode, n, k).T, x, bias)
    x2 = xm.float().contiguous()
    if m <= GEMV_MAX_M and all(kernel in _LOOKUP.values() for kernel, _ in calls):
        # sign planes by lookups one row at a time: each row reads the planes again, but the vq8 form's
        # table read per code and row cost several times that
        rows = [_gemv_one(row, calls, signs, block, n) for row in x2.numpy()]
        return _finish(torch.from_numpy(np.concatenate(rows)), x, bias)
    xr = x2.numpy() if signs is None else rotate_rows(x2, signs, block)
    if m <= GEMV_MAX_M:
        out = np.zeros((m, n), dtype=np.float32)
        flat = xr.ravel()
        for kernel, args in _few_calls(stages):
            kernel(flat, k, *args, _SIGNS, out)
        y = torch.from_numpy(out)
    else:
        w = np.empty(n * k, dtype=np.float32)  # per call: a buffer kept per shape would live as long as the process
        fused = _signs_decode(stages, k, False)
        if fused is not None:  # sign planes summed in registers and written once, not a pass each
            fused[0](*fused[1], w, k)
        else:
            for i, (codes, scale, table, plane) in enumerate(stages):
                _DECODE[plane](codes, scale, table, _SIGNS, w, k, i > 0)
        wt = torch.from_numpy(w).view(n, k)
        if half:  # stages no bf16 decode takes: decoded in fp32 first, then the same bf16 GEMM
            y = torch.from_numpy(xr).bfloat16() @ wt.bfloat16().T
        else:
            y = torch.from_numpy(xr) @ wt.T
    return _finish(y, x, bias)


def _finish(y: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """fp32 [M, N] products -> plus the bias, in x's dtype and leading shape."""
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], y.shape[-1])
