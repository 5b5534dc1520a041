"""Eight-lane fp32 vectors for numba kernels: a numba type backed by LLVM's ``<8 x float>`` (and a
sixteen-lane one for the sign planes' masked adds and table lookups, at the end).

Why: numba has no SIMD types, and LLVM does not find the vector form of an RBE decode by
itself. Given ``acc += table[idx] * signs[s] * x[8v:8v+8]`` as scalar code, it either stays
scalar (one load per weight per operand) or vectorizes across codes with gathers (worse).
Stated as one 8-lane load per operand and one fused multiply-add per code it runs several times
faster (``NOTES.md``), and LLVM keeps the accumulators in registers. The operations are the few the kernels
need; every one is plain LLVM IR, so numba compiles them for whatever CPU it runs on.

Two scalar loads go with them: ``sload`` (an element of a flat array) and ``hload`` (an fp16
element, read from its 16 bits, as fp32). Indexing a numba array costs a negative-index
wraparound check per access (three instructions around every code load); these do not, and
numba has no fp16 type of its own.

Loads and stores do no bounds checks: a caller proves its offsets in range (the kernels mask
every code index into its table and check every array shape before the first call).
"""

from __future__ import annotations

from llvmlite import ir
from llvmlite.binding import get_host_cpu_features
from numba import types
from numba.extending import intrinsic, models, register_model

LANES = 8
_FAST = ("fast",)


def _lanes_type(lanes: int, element: ir.Type = ir.FloatType(), kind: str = "F32") -> tuple[types.Type, ir.VectorType]:
    """A numba type of ``lanes`` lanes of ``element`` (fp32 unless given) held in vector registers,
    and its LLVM vector type."""
    vec = ir.VectorType(element, lanes)
    name = f"{kind}x{lanes}"
    cls = type(name, (types.Type,), {"__init__": lambda self: types.Type.__init__(self, name=name)})
    register_model(cls)(type(f"_{name}Model", (models.PrimitiveModel,), {
        "__init__": lambda self, dmm, fe_type: models.PrimitiveModel.__init__(self, dmm, fe_type, vec)}))
    return cls(), vec


f32x8, _VEC = _lanes_type(LANES)
F32x8 = type(f32x8)  # the type's class, by its public name


def _pointer(context, builder, ary_type, ary, offset, vec=_VEC):
    data = context.make_array(ary_type)(context, builder, ary).data
    return builder.bitcast(builder.gep(data, [offset]), vec.as_pointer())


def _load(builder, pointer, align: int):
    load = builder.load(pointer)
    load.align = align
    return load


@intrinsic
def vzero(typingctx):
    """(0, ..., 0)."""
    return f32x8(), lambda context, builder, sig, args: ir.Constant(_VEC, [0.0] * LANES)


@intrinsic
def vload(typingctx, arr, offset):
    """``arr[offset : offset + 8]`` of a contiguous 1-D float32 array."""
    if not (isinstance(arr, types.Array) and arr.dtype == types.float32 and arr.ndim == 1):
        return None

    def codegen(context, builder, sig, args):
        return _load(builder, _pointer(context, builder, sig.args[0], args[0], args[1]), 4)

    return f32x8(arr, offset), codegen


@intrinsic
def sload(typingctx, arr, offset):
    """``arr[offset]`` of a contiguous 1-D array, without numba's wraparound of negative offsets."""
    if not (isinstance(arr, types.Array) and arr.ndim == 1 and isinstance(arr.dtype, (types.Integer, types.Float))):
        return None

    def codegen(context, builder, sig, args):
        data = context.make_array(sig.args[0])(context, builder, args[0]).data
        return builder.load(builder.gep(data, [args[1]]))

    return arr.dtype(arr, offset), codegen


@intrinsic
def hload(typingctx, arr, offset):
    """The fp16 value whose bits are ``arr[offset]`` (a 1-D int16/uint16 array), as a float32."""
    if not (isinstance(arr, types.Array) and arr.ndim == 1 and arr.dtype in (types.int16, types.uint16)):
        return None

    def codegen(context, builder, sig, args):
        data = context.make_array(sig.args[0])(context, builder, args[0]).data
        bits = builder.load(builder.gep(data, [args[1]]))
        return builder.fpext(builder.bitcast(bits, ir.HalfType()), ir.FloatType())

    return types.float32(arr, offset), codegen


def _fp32_lanes(*ts: types.Type) -> bool:
    """Whether every type is one of this module's fp32 vectors (eight or sixteen lanes)."""
    return all(t in (f32x8, f32x16) for t in ts)


def _splat(builder: ir.IRBuilder, value: ir.Value, vec: ir.VectorType) -> ir.Value:
    """``value`` in every lane of ``vec``."""
    one = builder.insert_element(ir.Constant(vec, ir.Undefined), value, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(one, one, ir.Constant(ir.VectorType(ir.IntType(32), vec.count), [0] * vec.count))


@intrinsic
def vstore(typingctx, arr, offset, value):
    """``arr[offset : offset + lanes] = value`` (eight or sixteen fp32 lanes)."""
    if not (isinstance(arr, types.Array) and arr.dtype == types.float32 and arr.ndim == 1 and _fp32_lanes(value)):
        return None

    def codegen(context, builder, sig, args):
        store = builder.store(args[2], _pointer(context, builder, sig.args[0], args[0], args[1], args[2].type))
        store.align = 4
        return context.get_dummy_value()

    return types.none(arr, offset, value), codegen


@intrinsic
def vstore_bf16(typingctx, arr, offset, value):
    """``arr[offset : offset + 8]`` = the bf16 bits of ``value`` (a 1-D int16/uint16 array), rounded to
    nearest even as torch rounds (finite values: the kernels store decoded weights)."""
    if not (isinstance(arr, types.Array) and arr.ndim == 1 and arr.dtype in (types.int16, types.uint16)):
        return None

    def codegen(context, builder, sig, args):
        i32 = ir.VectorType(ir.IntType(32), LANES)
        bits = builder.bitcast(args[2], i32)
        sixteen = ir.Constant(i32, [16] * LANES)
        odd = builder.and_(builder.lshr(bits, sixteen), ir.Constant(i32, [1] * LANES))
        rounded = builder.add(bits, builder.add(odd, ir.Constant(i32, [0x7FFF] * LANES)))
        half = builder.trunc(builder.lshr(rounded, sixteen), ir.VectorType(ir.IntType(16), LANES))
        data = context.make_array(sig.args[0])(context, builder, args[0]).data
        ptr = builder.bitcast(builder.gep(data, [args[1]]), half.type.as_pointer())
        builder.store(half, ptr).align = 2
        return context.get_dummy_value()

    return types.none(arr, offset, value), codegen


@intrinsic
def vload_bf16(typingctx, arr, offset):
    """``arr[offset : offset + 8]`` of a 1-D int16/uint16 array of bf16 bits, as fp32 (exact)."""
    if not (isinstance(arr, types.Array) and arr.ndim == 1 and arr.dtype in (types.int16, types.uint16)):
        return None

    def codegen(context, builder, sig, args):
        i32 = ir.VectorType(ir.IntType(32), LANES)
        half = _load(builder, _pointer(context, builder, sig.args[0], args[0], args[1],
                                       ir.VectorType(ir.IntType(16), LANES)), 2)
        bits = builder.shl(builder.zext(half, i32), ir.Constant(i32, [16] * LANES))
        return builder.bitcast(bits, _VEC)

    return f32x8(arr, offset), codegen


@intrinsic
def vhadamard8(typingctx, v):
    """``H_8 v`` (Sylvester order, unnormalized) of one 8-lane vector: three butterfly stages in
    registers, each a lane swap and a multiply-add by +-1 (lane i: ``v[i ^ d] + v[i]`` where bit
    ``d`` of i is clear, ``v[i ^ d] - v[i]`` where it is set)."""
    if v != f32x8:
        return None

    def codegen(context, builder, sig, args):
        out = args[0]
        for d in (1, 2, 4):
            swapped = builder.shuffle_vector(out, out, ir.Constant(ir.VectorType(ir.IntType(32), LANES),
                                                                   [i ^ d for i in range(LANES)]))
            sign = ir.Constant(_VEC, [-1.0 if i & d else 1.0 for i in range(LANES)])
            out = builder.fadd(builder.fmul(out, sign, flags=_FAST), swapped, flags=_FAST)
        return out

    return f32x8(v), codegen


@intrinsic
def vbroadcast(typingctx, value):
    """(value, ..., value) of a float32."""
    return f32x8(types.float32), lambda context, builder, sig, args: _splat(builder, args[0], _VEC)


@intrinsic
def vmul(typingctx, a, b):
    """Lane-wise ``a * b``."""
    return f32x8(a, b), lambda context, builder, sig, args: builder.fmul(args[0], args[1], flags=_FAST)


@intrinsic
def vadd(typingctx, a, b):
    """Lane-wise ``a + b`` (eight or sixteen lanes)."""
    if not (_fp32_lanes(a) and a == b):
        return None
    return a(a, b), lambda context, builder, sig, args: builder.fadd(args[0], args[1], flags=_FAST)


@intrinsic
def vsub(typingctx, a, b):
    """Lane-wise ``a - b``."""
    return f32x8(a, b), lambda context, builder, sig, args: builder.fsub(args[0], args[1], flags=_FAST)


@intrinsic
def vfma(typingctx, a, b, c):
    """Lane-wise ``a * b + c``, eight or sixteen lanes (fast-math: one fused instruction where the CPU
    has FMA)."""
    if not (_fp32_lanes(a) and a == b == c):
        return None

    def codegen(context, builder, sig, args):
        return builder.fadd(builder.fmul(args[0], args[1], flags=_FAST), args[2], flags=_FAST)

    return a(a, b, c), codegen


@intrinsic
def vsum(typingctx, a):
    """The sum of the lanes, a float32."""

    return types.float32(a), lambda context, builder, sig, args: _tree_sum(builder, args[0], LANES)


def _tree_sum(builder: ir.IRBuilder, vec: ir.Value, lanes: int) -> ir.Value:
    """The sum of a vector's lanes, pairwise: a log-depth tree."""
    parts = [builder.extract_element(vec, ir.Constant(ir.IntType(32), i)) for i in range(lanes)]
    while len(parts) > 1:
        parts = [builder.fadd(parts[i], parts[i + 1], flags=_FAST) for i in range(0, len(parts), 2)]
    return parts[0]


# ----------------------------------------------------------------------------- sixteen lanes, under a bit mask
# The b1 planes store a sign bit per weight: 16 weights' bits are one 16-bit word, and a 16-lane add
# under that word as a mask (one masked ``vaddps`` on AVX-512, a blend on narrower CPUs) sums the
# inputs a plane negates, with no table and no multiply.

LANES16 = 16
f32x16, _VEC16 = _lanes_type(LANES16)


@intrinsic
def vzero16(typingctx):
    """(0, ..., 0), sixteen lanes."""
    return f32x16(), lambda context, builder, sig, args: ir.Constant(_VEC16, [0.0] * LANES16)


@intrinsic
def vload16(typingctx, arr, offset):
    """``arr[offset : offset + 16]`` of a contiguous 1-D float32 array."""
    if not (isinstance(arr, types.Array) and arr.dtype == types.float32 and arr.ndim == 1):
        return None

    def codegen(context, builder, sig, args):
        return _load(builder, _pointer(context, builder, sig.args[0], args[0], args[1], _VEC16), 4)

    return f32x16(arr, offset), codegen


@intrinsic
def vmaskadd16(typingctx, acc, x, words, offset):
    """``acc`` plus the lanes of ``x`` whose bit is set in ``words[offset]`` (a 1-D uint16 array; bit j
    is lane j), the others plus zero."""
    if not (isinstance(words, types.Array) and words.ndim == 1 and words.dtype == types.uint16):
        return None

    def codegen(context, builder, sig, args):
        data = context.make_array(sig.args[2])(context, builder, args[2]).data
        mask = builder.bitcast(builder.load(builder.gep(data, [args[3]])), ir.VectorType(ir.IntType(1), LANES16))
        picked = builder.select(mask, args[1], ir.Constant(_VEC16, [0.0] * LANES16))
        return builder.fadd(args[0], picked, flags=_FAST)

    return f32x16(acc, x, words, offset), codegen


@intrinsic
def vsum16(typingctx, a):
    """The sum of the sixteen lanes, a float32."""

    return types.float32(a), lambda context, builder, sig, args: _tree_sum(builder, args[0], LANES16)


# ----------------------------------------------------------------------------- sixteen lanes, table lookups
# The b1 planes' lookup form (T-MAC's idea, in fp32): per four inputs a 16-entry table of their sums under
# every sign pattern, and one ``vpermps`` (AVX-512) looking up sixteen rows' 4-bit patterns at once. The
# instruction is x86's own (an LLVM x86 intrinsic, not plain IR): a kernel that uses ``vlookup16`` is
# compiled and called only where ``HAS_AVX512`` holds.

HAS_AVX512 = bool(get_host_cpu_features().get("avx512f"))
_I32 = ir.IntType(32)
i32x16, _D16 = _lanes_type(16, _I32, "I32")


@intrinsic
def iload16(typingctx, arr, offset):
    """``arr[offset : offset + 16]`` of a contiguous 1-D uint32 array, as sixteen int32 lanes."""
    if not (isinstance(arr, types.Array) and arr.ndim == 1 and arr.dtype == types.uint32):
        return None

    def codegen(context, builder, sig, args):
        return _load(builder, _pointer(context, builder, sig.args[0], args[0], args[1], _D16), 4)

    return i32x16(arr, offset), codegen


@intrinsic
def vlookup16(typingctx, tables, offset, idx, shift):
    """Lane l: ``tables[offset + ((idx[l] >> shift) & 15)]`` (``tables`` a 1-D float32 array, ``shift``
    a constant-folded integer): one ``vpermps``, which reads only the low four bits of each index."""
    if not (isinstance(tables, types.Array) and tables.ndim == 1 and tables.dtype == types.float32):
        return None

    def codegen(context, builder, sig, args):
        table = _load(builder, _pointer(context, builder, sig.args[0], args[0], args[1], _VEC16), 4)
        lanes = builder.lshr(args[2], _splat(builder, builder.trunc(args[3], _I32), _D16))
        fn = builder.module.declare_intrinsic("llvm.x86.avx512.permvar.sf.512",
                                              fnty=ir.FunctionType(_VEC16, [_VEC16, _D16]))
        return builder.call(fn, [table, lanes])

    return f32x16(tables, offset, idx, types.int64), codegen


@intrinsic
def vbroadcast16(typingctx, value):
    """(value, ..., value) of a float32, sixteen lanes."""
    return f32x16(types.float32), lambda context, builder, sig, args: _splat(builder, args[0], _VEC16)


@intrinsic
def prefetch(typingctx, arr, offset):
    """A hint to bring the cache line of ``arr[offset]`` (a 1-D array) into the caches; no fault
    past the end (a prefetch of an unmapped address is dropped)."""
    if not (isinstance(arr, types.Array) and arr.ndim == 1):
        return None

    def codegen(context, builder, sig, args):
        ptr = _pointer(context, builder, sig.args[0], args[0], args[1], ir.IntType(8))
        fn = builder.module.declare_intrinsic("llvm.prefetch", fnty=ir.FunctionType(
            ir.VoidType(), [ir.IntType(8).as_pointer(), ir.IntType(32), ir.IntType(32), ir.IntType(32)]))
        builder.call(fn, [ptr, ir.Constant(ir.IntType(32), 0), ir.Constant(ir.IntType(32), 3),
                          ir.Constant(ir.IntType(32), 1)])
        return context.get_dummy_value()

    return types.none(arr, offset), codegen
