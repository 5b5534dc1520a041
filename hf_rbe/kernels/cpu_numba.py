"""CPU kernels for RBE format v2 (numba): ``y = x W^T`` straight from the codes, all cores, SIMD.

Small M (decoding, ``M <= GEMV_MAX_M``): the input rows get the layer's rotation by a fast
Walsh-Hadamard transform (``K log B`` adds), then every output row (in parallel, ``prange``)
walks its codes. An e8p code costs one 8-lane load from the 512-entry table, one from the
128-entry +-1 sign table (16 KiB + 4 KiB: both stay in L1), one of x and a multiply and a fused
multiply-add (``cpu_simd``); vq8 / vq4 codes read a signed 8-vector. At M = 1 an e8p stage and
the stage after it run in one pass (one x load feeds both); for M > 1 each codeword is decoded
once per block of four input rows.
Larger M (prefill): every stage decodes into an fp32 buffer allocated for the call, and the
product goes to BLAS (``torch.matmul``). ``linear`` picks by M.

Compiled by numba on first use and cached on disk (``cache=True``): no compiler at install
time. The PyTorch reference of the op (``hf_rbe.core.ops``) is the oracle of the tests.
"""

from __future__ import annotations

import functools
import math

import numba as nb
import numpy as np
import torch

from hf_rbe.core.format_v2 import FORMAT_ID, IDX_OFFSET, PLANES, SIGN_OFFSET, VECTOR_DIM, LayerSpecV2, e8p_sign_table
from hf_rbe.core.moved import renamed
from hf_rbe.core.op_layout import SIGNS, op_tensor_names

from .cpu_simd import vadd, vbroadcast, vfma, vload, vmul, vstore, vsum, vzero

#: Largest M the code-walking GEMV serves; above it decode + BLAS is faster (the crossover
#: ``NOTES.md`` records, on SmolLM2 and 4096x4096 shapes).
GEMV_MAX_M = 12
_E8P_IDX = PLANES["e8p"].table_size - 1  # the idx field's mask
_NIBBLE = PLANES["vq4"].table_size - 1


def _rotate_rows(x: np.ndarray, signs: np.ndarray, block: int) -> np.ndarray:
    """``x S H`` per block of ``block`` columns for x [M, K] (fp32), by in-place butterflies."""
    m, k = x.shape
    out = np.empty_like(x)
    norm = np.float32(1.0 / math.sqrt(block))
    for r in nb.prange(m):
        for i in range(k):
            out[r, i] = x[r, i] * signs[i]
        h = 1
        while h < block:
            for start in range(0, k, 2 * h):
                for j in range(start, start + h):
                    a = out[r, j]
                    b = out[r, j + h]
                    out[r, j] = a + b
                    out[r, j + h] = a - b
            h *= 2
        for i in range(k):
            out[r, i] *= norm
    return out


_rotate_many = nb.njit(cache=True, parallel=True, fastmath=True)(_rotate_rows)
_rotate_few = nb.njit(cache=True, fastmath=True)(_rotate_rows)  # a thread launch costs more than a few rows


@nb.njit(cache=True, inline="always")
def _e8p_vector(codes: np.ndarray, n: int, v: int, table: np.ndarray, signs: np.ndarray):  # noqa: ANN202
    c = np.int32(codes[n, v]) & 0xFFFF  # int16 storage: the code's 16 bits, unsigned
    return vmul(vload(table, ((c >> IDX_OFFSET) & _E8P_IDX) << 3), vload(signs, (c >> SIGN_OFFSET) << 3))


@nb.njit(cache=True, inline="always")
def _signed_vector(codes: np.ndarray, n: int, v: int, table: np.ndarray, nibbles: bool):  # noqa: ANN202
    if nibbles:
        i = (np.int32(codes[n, v >> 1]) >> ((v & 1) << 2)) & _NIBBLE
    else:
        i = np.int32(codes[n, v])
    return vload(table, i << 3)


@nb.njit(cache=True, inline="always")
def _codeword(codes: np.ndarray, n: int, v: int, table: np.ndarray, signs: np.ndarray, plane: int):  # noqa: ANN202
    if plane == 0:
        return _e8p_vector(codes, n, v, table, signs)
    return _signed_vector(codes, n, v, table, plane == 2)


@nb.njit(cache=True, parallel=True, fastmath=True)
def _gemv(x: np.ndarray, k: int, codes: np.ndarray, scale: np.ndarray, table: np.ndarray, signs: np.ndarray,
          plane: int, out: np.ndarray) -> None:
    """out[m, n] += sum_g scale[n, g] * (x_m . the stage's codewords of row n in group g).
    ``x`` is the flat [M * K] rotated input; ``plane``: 0 e8p, 1 vq8, 2 vq4."""
    m_rows, n_rows = out.shape
    n_groups = scale.shape[1]
    per_group = (k // 8) // n_groups
    for n in nb.prange(n_rows):
        for m in range(m_rows):
            base = m * k
            total = np.float32(0.0)
            for g in range(n_groups):
                a0 = vzero()
                a1 = vzero()  # two accumulators: two FMA chains in flight
                v = g * per_group
                end = v + per_group
                while v + 1 < end:
                    a0 = vfma(_codeword(codes, n, v, table, signs, plane), vload(x, base + (v << 3)), a0)
                    a1 = vfma(_codeword(codes, n, v + 1, table, signs, plane), vload(x, base + ((v + 1) << 3)), a1)
                    v += 2
                if v < end:
                    a0 = vfma(_codeword(codes, n, v, table, signs, plane), vload(x, base + (v << 3)), a0)
                total += np.float32(scale[n, g]) * vsum(vadd(a0, a1))
            out[m, n] += total


@nb.njit(cache=True, parallel=True, fastmath=True)
def _gemv2(x: np.ndarray, k: int, codes0: np.ndarray, scale0: np.ndarray, table0: np.ndarray,
           codes1: np.ndarray, scale1: np.ndarray, table1: np.ndarray, plane1: int, signs: np.ndarray,
           out: np.ndarray) -> None:
    """``_gemv`` of an e8p stage and the next (same scale groups) in one pass: each x load feeds
    both stages' accumulators (two FMA chains in flight), and the outputs are written once."""
    m_rows, n_rows = out.shape
    n_groups = scale0.shape[1]
    per_group = (k // 8) // n_groups
    for n in nb.prange(n_rows):
        for m in range(m_rows):
            base = m * k
            total = np.float32(0.0)
            for g in range(n_groups):
                a0 = vzero()
                a1 = vzero()
                for v in range(g * per_group, (g + 1) * per_group):
                    xv = vload(x, base + (v << 3))
                    a0 = vfma(_e8p_vector(codes0, n, v, table0, signs), xv, a0)
                    a1 = vfma(_codeword(codes1, n, v, table1, signs, plane1), xv, a1)
                total += np.float32(scale0[n, g]) * vsum(a0) + np.float32(scale1[n, g]) * vsum(a1)
            out[m, n] += total


@nb.njit(cache=True, parallel=True, fastmath=True)
def _gemv4(x: np.ndarray, k: int, codes: np.ndarray, scale: np.ndarray, table: np.ndarray, signs: np.ndarray,
           plane: int, out: np.ndarray) -> None:
    """``_gemv`` for M > 1: input rows in blocks of four, so each codeword is decoded once per
    block and feeds four accumulators (a short block repeats its last row and drops it)."""
    m_rows, n_rows = out.shape
    n_groups = scale.shape[1]
    per_group = (k // 8) // n_groups
    for n in nb.prange(n_rows):
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
                    w = _codeword(codes, n, v, table, signs, plane)
                    o = v << 3
                    a0 = vfma(w, vload(x, b0 + o), a0)
                    a1 = vfma(w, vload(x, b1 + o), a1)
                    a2 = vfma(w, vload(x, b2 + o), a2)
                    a3 = vfma(w, vload(x, b3 + o), a3)
                s = np.float32(scale[n, g])
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


@nb.njit(cache=True, parallel=True, fastmath=True)
def _decode(codes: np.ndarray, scale: np.ndarray, table: np.ndarray, signs: np.ndarray, plane: int,
            w: np.ndarray, k: int, accumulate: bool) -> None:
    """The flat [N * K] buffer ``w`` (+)= the stage's decoded, still rotated weight (fp32)."""
    n_rows, n_groups = scale.shape
    per_group = (k // 8) // n_groups
    for n in nb.prange(n_rows):
        for v in range(k // 8):
            s = vbroadcast(np.float32(scale[n, v // per_group]))
            if plane == 0:
                val = vmul(_e8p_vector(codes, n, v, table, signs), s)
            else:
                val = vmul(_signed_vector(codes, n, v, table, plane == 2), s)
            at = n * k + (v << 3)
            if accumulate:
                val = vadd(val, vload(w, at))
            vstore(w, at, val)


_SIGNS = e8p_sign_table().numpy().ravel().copy()
__getattr__ = renamed("hf_rbe.kernels.cpu_numba", {
    "sign_table": ("hf_rbe.core.format_v2.e8p_sign_table", lambda: e8p_sign_table().numpy().copy())})
_PLANE_IDS = {"e8p": 0, "vq8": 1, "vq4": 2}


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
    """Per stage: (codes, fp32 scales, flat fp32 table, plane id), every shape and dtype checked:
    the kernels index without bounds checks, so nothing unchecked may reach them."""
    out = []
    for prefix, plane, want in stages:
        for name, shape, dtype in want:
            t = named[name]
            if t.shape != shape or t.dtype != dtype:
                raise ValueError(f"hf_rbe::linear: {name} is {t.dtype}{list(t.shape)}, the layout needs "
                                 f"{dtype}{list(shape)}")
        out.append((named[prefix + "weight"].numpy(force=True), named[prefix + "scale"].detach().float().numpy(),
                    named[prefix + "table"].numpy(force=True).ravel(), plane))
    return out


def _rotated(x2: torch.Tensor, spec: LayerSpecV2, named: dict[str, torch.Tensor], k: int) -> np.ndarray:
    if not spec.rotation:
        return x2.numpy()
    signs = named[SIGNS]
    if signs.shape != (k,):
        raise ValueError(f"hf_rbe::linear: {SIGNS} has shape {list(signs.shape)}, the layout needs [{k}]")
    rotate = _rotate_few if x2.shape[0] <= GEMV_MAX_M else _rotate_many
    return rotate(x2.numpy(), signs.detach().float().numpy(), spec.hadamard_block(k))


def linear(x: torch.Tensor, tensors: list[torch.Tensor], layout: list[int], bias: torch.Tensor | None) -> torch.Tensor:
    """``hf_rbe::linear`` of a v2 layer on CPU tensors: ``x`` [..., K] -> ``x W^T + b`` in x's dtype."""
    spec, names, stage_specs = _parse(tuple(layout))
    n, k = layout[1], layout[2]
    if x.shape[-1] != k:
        raise ValueError(f"hf_rbe::linear: x has {x.shape[-1]} features, the layer takes {k}")
    named = dict(zip(names, tensors))
    lead = x.shape[:-1]
    x2 = x.detach().reshape(-1, k).float().contiguous()
    m = x2.shape[0]
    stages = _stages(stage_specs, named)
    xr = _rotated(x2, spec, named, k)
    if m <= GEMV_MAX_M:
        out = np.zeros((m, n), dtype=np.float32)
        flat = xr.ravel()
        while stages:
            if m == 1 and len(stages) >= 2 and stages[0][3] == 0 and stages[0][1].shape == stages[1][1].shape:
                (c0, s0, t0, _), (c1, s1, t1, p1) = stages[:2]
                _gemv2(flat, k, c0, s0, t0, c1, s1, t1, p1, _SIGNS, out)
                stages = stages[2:]
            else:
                codes, scale, table, plane = stages.pop(0)
                (_gemv if m == 1 else _gemv4)(flat, k, codes, scale, table, _SIGNS, plane, out)
        y = torch.from_numpy(out)
    else:
        w = np.empty(n * k, dtype=np.float32)  # per call: a buffer kept per shape would live as long as the process
        for i, (codes, scale, table, plane) in enumerate(stages):
            _decode(codes, scale, table, _SIGNS, plane, w, k, i > 0)
        y = torch.from_numpy(xr) @ torch.from_numpy(w).view(n, k).T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).reshape(*lead, n)
