"""An int8 form of the v2-2 / v2-3 GEMV for ``bench/cpu_kernel_variants.py``: does VNNI lift the table-read bound?

The question (``hf_rbe/kernels/NOTES.md``, issue #28): llama.cpp's k-quants reach the memory
bandwidth on this CPU by quantizing the activations to int8 and multiplying with integer dot
products, 64 weights per instruction. This is that idea for the v2 planes: the input row is
quantized to int8 per block of ``XBLOCK`` weights (its magnitudes as uint8, its signs as one 64-bit
mask per 64 weights), the stage tables to int8 with one scale each; eight codes (64 weights) at a
time, each code's table row is read as 8 bytes, the e8p signs come from a 128-byte lookup held in
two registers (``vpermi2b``) and, XOR-ed with the input's signs, negate bytes under a mask, and one
``vpdpbusd`` multiplies the 64 weights by the input. ``no table reads`` is the same loop with every
code's table row taken from row 0: not a kernel (its output is wrong), the ceiling of this form
once the table reads cost nothing.

Needs AVX-512 VNNI and VBMI (``available()``). The int8 vector type, its loads, ``vpdpbusd`` and the
e8p and vq8 decodes (a table row per code, ``vpermi2b`` for the signs) are this file's only, the form not
being in the library (whose sign planes left ``vpdpbusd`` for table lookups: ``hf_rbe/kernels/NOTES.md``).
"""

from __future__ import annotations

import llvmlite.binding as llvm
import numba as nb
import numpy as np
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from hf_rbe.kernels.cpu_simd import (
    _VEC16,
    _lanes_type,
    _load,
    _pointer,
    f32x16,
    hload,
    i32x16,
    sload,
    vsum16,
    vzero16,
)

XBLOCK = 256  # input weights per int8 scale (llama.cpp's Q8_K block); 64 where K is not a multiple
_I1, _I8, _I16, _I32, _I64 = (ir.IntType(b) for b in (1, 8, 16, 32, 64))
i8x64, _B64 = _lanes_type(64, _I8, "I8")
_D16 = ir.VectorType(_I32, 16)


@intrinsic
def bload64(typingctx, arr, offset):  # noqa: ANN001, ANN201
    """``arr[offset : offset + 64]`` of a contiguous 1-D int8 or uint8 array, as 64 bytes."""
    if not (isinstance(arr, types.Array) and arr.ndim == 1 and arr.dtype in (types.int8, types.uint8)):
        return None

    def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
        return _load(builder, _pointer(context, builder, sig.args[0], args[0], args[1], _B64), 1)

    return i8x64(arr, offset), codegen


@intrinsic
def izero16(typingctx):  # noqa: ANN001, ANN201
    """(0, ..., 0), sixteen int32 lanes."""
    return i32x16(), lambda context, builder, sig, args: ir.Constant(_D16, [0] * 16)


@intrinsic
def dpbusd(typingctx, acc, u, s):  # noqa: ANN001, ANN201
    """``acc`` plus, in each int32 lane, the four products of its bytes of ``u`` (unsigned) and ``s``
    (signed): ``vpdpbusd``."""

    def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
        fn = builder.module.declare_intrinsic("llvm.x86.avx512.vpdpbusd.512",
                                              fnty=ir.FunctionType(_D16, [_D16, _B64, _B64]))
        return builder.call(fn, list(args))

    return i32x16(acc, u, s), codegen


@intrinsic
def vfma_int16(typingctx, acc, ints, scale):  # noqa: ANN001, ANN201
    """``acc + float(ints) * scale``: sixteen int32 lanes into sixteen fp32 lanes, ``scale`` a float32."""

    def codegen(context, builder, sig, args):  # noqa: ANN001, ANN202
        one = builder.insert_element(ir.Constant(_VEC16, ir.Undefined), args[2], ir.Constant(_I32, 0))
        wide = builder.shuffle_vector(one, one, ir.Constant(_D16, [0] * 16))
        return builder.fadd(builder.fmul(builder.sitofp(args[1], _VEC16), wide, flags=("fast",)), args[0],
                            flags=("fast",))

    return f32x16(acc, ints, types.float32), codegen


def available() -> bool:
    """Whether this CPU has the instructions the form uses."""
    f = llvm.get_host_cpu_features()
    return bool(f.get("avx512vnni") and f.get("avx512vbmi"))


def _data(context, builder, aty, a):  # noqa: ANN001, ANN202
    return context.make_array(aty)(context, builder, a).data


def _declare(builder, name: str, ret: ir.Type, args: list[ir.Type]):  # noqa: ANN001, ANN202
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ret, args), name)


def _rows(builder, table, code_ptr, at, mask: int, first_row_only: bool):  # noqa: ANN001, ANN202
    """The 8-byte table rows of the 8 codes at ``code_ptr[at:at+8]``, one scalar load each."""
    base = builder.bitcast(table, _I64.as_pointer())
    v = ir.Constant(ir.VectorType(_I64, 8), ir.Undefined)
    for i in range(8):
        c = builder.load(builder.gep(code_ptr, [builder.add(at, ir.Constant(at.type, i))]))
        j = builder.zext(builder.and_(c, ir.Constant(c.type, mask)), _I64)
        if first_row_only:
            j = builder.and_(j, ir.Constant(_I64, 0))
        ld = builder.load(builder.gep(base, [j]))
        ld.align = 8
        v = builder.insert_element(v, ld, ir.Constant(_I32, i))
    return builder.bitcast(v, _B64)


def _negate_where(builder, w, mask64):  # noqa: ANN001, ANN202
    m = builder.bitcast(mask64, ir.VectorType(_I1, 64))
    return builder.select(m, builder.sub(ir.Constant(_B64, [0] * 64), w), w)


def _e8p(first_row_only: bool):  # noqa: ANN202
    @intrinsic
    def e8p(typingctx, codes, at, table, sign_lo, sign_hi, xneg):  # noqa: ANN001, ANN202
        """The 64 int8 weights of the e8p codes ``codes[at:at+8]`` (int16), their signs and the input's
        (``xneg``: bit j set where input j is negative) applied."""
        def cg(context, builder, sig, args):  # noqa: ANN001, ANN202
            codes_a, at_, table_a, lo, hi, xneg_ = args
            cp = builder.bitcast(_data(context, builder, sig.args[0], codes_a), _I16.as_pointer())
            w = _rows(builder, _data(context, builder, sig.args[2], table_a), cp, at_, 511, first_row_only)
            c = builder.load(builder.bitcast(builder.gep(cp, [at_]), ir.VectorType(_I16, 8).as_pointer()))
            c.align = 2
            s = builder.trunc(builder.lshr(c, ir.Constant(c.type, [9] * 8)), ir.VectorType(_I8, 8))
            idx = builder.shuffle_vector(s, ir.Constant(s.type, ir.Undefined),
                                         ir.Constant(ir.VectorType(_I32, 64), list(range(8)) * 8))
            signs = builder.call(_declare(builder, "llvm.x86.avx512.vpermi2var.qi.512", _B64, [_B64] * 3), [lo, idx, hi])
            m = builder.extract_element(builder.bitcast(signs, ir.VectorType(_I64, 8)), ir.Constant(_I32, 0))
            return _negate_where(builder, w, builder.xor(m, xneg_))
        return i8x64(codes, at, table, sign_lo, sign_hi, xneg), cg
    return e8p


def _vq8(first_row_only: bool):  # noqa: ANN202
    @intrinsic
    def vq8(typingctx, codes, at, table, xneg):  # noqa: ANN001, ANN202
        """The 64 int8 weights of the vq8 codes ``codes[at:at+8]`` (uint8), the input's signs applied."""
        def cg(context, builder, sig, args):  # noqa: ANN001, ANN202
            codes_a, at_, table_a, xneg_ = args
            cp = builder.bitcast(_data(context, builder, sig.args[0], codes_a), _I8.as_pointer())
            w = _rows(builder, _data(context, builder, sig.args[2], table_a), cp, at_, 255, first_row_only)
            return _negate_where(builder, w, xneg_)
        return i8x64(codes, at, table, xneg), cg
    return vq8


e8p_i8, e8p_row0 = _e8p(False), _e8p(True)
vq8_i8, vq8_row0 = _vq8(False), _vq8(True)


@nb.njit(fastmath=True)
def quantize_x(x, xblock, xu, xneg, dx):  # noqa: ANN001, ANN201
    """x fp32 [K] -> magnitudes uint8 [K], sign masks uint64 [K / 64], scales fp32 [K / xblock]."""
    for b in range(x.shape[0] // xblock):
        m = np.float32(0.0)
        for i in range(b * xblock, (b + 1) * xblock):
            m = max(m, abs(x[i]))
        d = m / np.float32(127.0) if m > 0 else np.float32(1.0)
        dx[b] = d
        for i in range(b * xblock, (b + 1) * xblock):
            xu[i] = abs(np.int32(np.rint(x[i] / d)))
    for s in range(x.shape[0] // 64):
        mk = np.uint64(0)
        for j in range(64):
            if x[s * 64 + j] < 0:
                mk |= np.uint64(1) << np.uint64(j)
        xneg[s] = mk


def _kernel(two: bool, first_row_only: bool):  # noqa: ANN202
    e8p = e8p_row0 if first_row_only else e8p_i8
    vq8 = vq8_row0 if first_row_only else vq8_i8

    @nb.njit(parallel=True, fastmath=True)
    def gemv(xu, xneg, dx, xsteps, k, codes0, scale0, table0, st0, codes1, scale1, table1, st1, sign_bytes, out):  # noqa: ANN001, ANN202
        """One row's scale per stage (the variants' layers); two output rows per iteration."""
        n_rows = out.shape[1]
        cols = k // 8
        lo = bload64(sign_bytes, 0)
        hi = bload64(sign_bytes, 64)
        for p in nb.prange((n_rows + 1) // 2):
            n0 = 2 * p
            n1 = min(n0 + 1, n_rows - 1)
            r0 = n0 * cols
            r1 = n1 * cols
            fa0 = vzero16()
            fa1 = vzero16()
            fb0 = vzero16()
            fb1 = vzero16()
            for xb in range(0, k // 64, xsteps):
                a0 = izero16()
                a1 = izero16()
                b0 = izero16()
                b1 = izero16()
                for s in range(xb, xb + xsteps):
                    xv = bload64(xu, s << 6)
                    xm = sload(xneg, s)
                    a0 = dpbusd(a0, xv, e8p(codes0, r0 + (s << 3), table0, lo, hi, xm))
                    b0 = dpbusd(b0, xv, e8p(codes0, r1 + (s << 3), table0, lo, hi, xm))
                    if two:
                        a1 = dpbusd(a1, xv, vq8(codes1, r0 + (s << 3), table1, xm))
                        b1 = dpbusd(b1, xv, vq8(codes1, r1 + (s << 3), table1, xm))
                d = sload(dx, xb // xsteps)
                fa0 = vfma_int16(fa0, a0, d)
                fb0 = vfma_int16(fb0, b0, d)
                if two:
                    fa1 = vfma_int16(fa1, a1, d)
                    fb1 = vfma_int16(fb1, b1, d)
            t0 = hload(scale0, n0) * st0 * vsum16(fa0)
            t1 = hload(scale0, n1) * st0 * vsum16(fb0)
            if two:
                t0 += hload(scale1, n0) * st1 * vsum16(fa1)
                t1 += hload(scale1, n1) * st1 * vsum16(fb1)
            out[0, n0] += t0
            if n1 != n0:
                out[0, n1] += t1

    return gemv


KERNELS = {(two, row0): _kernel(two, row0) for two in (False, True) for row0 in (False, True)}


def int8_table(table: np.ndarray) -> tuple[np.ndarray, np.float32]:
    """A flat fp32 table as int8 (one scale for the table) and that scale."""
    scale = np.float32(np.abs(table).max() / 127)
    return np.rint(table / scale).astype(np.int8), scale


def sign_bytes(signs: np.ndarray) -> np.ndarray:
    """The [128, 8] +-1 e8p sign table as 128 bytes: bit j set where coordinate j is negated."""
    return ((signs < 0) << np.arange(8)).sum(1).astype(np.uint8)


def prepare(layer: dict[str, np.ndarray], k: int) -> dict[str, np.ndarray]:
    """What the int8 form keeps of a random v2 layer (``bench/cpu_kernel_variants._layer``'s arrays):
    int8 tables and their scales, and its input's buffers."""
    if k % 64:
        raise ValueError(f"the int8 form walks 64 weights at a time: in_features {k} is not a multiple of 64")
    xblock = XBLOCK if k % XBLOCK == 0 else 64
    (t0, st0), (t1, st1) = int8_table(layer["t0"]), int8_table(layer["t1"])
    return {"t0q": t0, "st0": st0, "t1q": t1, "st1": st1, "xu": np.empty(k, np.uint8),
            "xneg": np.empty(k // 64, np.uint64), "dx": np.empty(k // xblock, np.float32)}


def gemv(layer: dict[str, np.ndarray], k: int, stages: int, signs: np.ndarray, out: np.ndarray,
         first_row_only: bool = False) -> None:
    """``out`` += the int8 product of ``layer`` (with ``prepare``'s arrays) at M = 1: the input
    quantized, then the stage(s) walked; ``signs`` as ``sign_bytes`` gives them."""
    xblock = k // layer["dx"].shape[0]
    quantize_x(layer["x"], xblock, layer["xu"], layer["xneg"], layer["dx"])
    KERNELS[(stages == 2, first_row_only)](
        layer["xu"], layer["xneg"], layer["dx"], xblock // 64, k, layer["c0f"], layer["s0b"], layer["t0q"],
        layer["st0"], layer["c1f"], layer["s1b"], layer["t1q"], layer["st1"], signs, out)
