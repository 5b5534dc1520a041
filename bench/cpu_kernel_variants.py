"""Why the CPU GEMV looks the way it does: the product kernels next to the forms they replaced or beat.

    python bench/cpu_kernel_variants.py            # results/cpu_kernel_variants.{json,md} (a few minutes)
    python bench/cpu_kernel_variants.py --smoke    # tiny shapes: checks the script only

At M = 1, for an e8p stage alone (v2-2) and e8p fused with a vq8 stage (v2-3), with random codes
(a kernel's cost does not depend on their values), weights streamed from memory (copies filling
``STREAM_BYTES``), all candidates timed round-robin in this process:

- ``product``: ``hf_rbe.kernels.cpu_numba`` (flat codes read by ``sload``, fp16 scales by ``hload``,
  two output rows per iteration sharing each x load, one loop compiled per residual plane);
- ``one row``: one output row per iteration (the product kernel of the second pass of issue #28);
- ``four chains``: one row, four accumulators per stage (four fused multiply-add chains in flight);
- ``indexed``: the same loops indexing 2-D numba arrays (numba's negative-index wraparound on every
  code load) with the scales converted to fp32 per call: the kernel before issue #28;
- ``16 offsets``: the fields of 16 codes extracted first into a scratch array (vectorizable),
  then the table loads and FMAs;
- ``int8 VNNI``: int8 activations and int8 tables, 64 weights per integer dot product
  (``bench/int8_simd.py``; on CPUs with AVX-512 VNNI and VBMI);
- ``no table reads``: that loop with every code's table row taken from row 0: not a kernel (its
  output is wrong), the ceiling of the int8 form once table reads cost nothing.
Every variant's output is checked against the product kernel's before timing: to 1e-5, the int8
one to ``INT8_TOLERANCE`` (its error is recorded in the row), the ceiling not at all.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time

import int8_simd
import numba as nb
import numpy as np

from hf_rbe.evaluation.results import run_meta, write_results
from hf_rbe.kernels import cpu_numba as cn
from hf_rbe.kernels.cpu_simd import hload, sload, vadd, vfma, vload, vmul, vsum, vzero

SHAPES = [(576, 1536), (4096, 14336)]  # (in_features, out_features)
STREAM_BYTES = 512 * 2**20
_SCRATCH = 16
#: Largest error of the int8 form (relative to the largest output) accepted: int8 rounding of the
#: input per block and of the tables, about a percent on Gaussian data.
INT8_TOLERANCE = 5e-2


@nb.njit(inline="always")
def _e8p_2d(codes, n, v, table, signs):  # noqa: ANN001, ANN202
    c = np.int32(codes[n, v]) & 0xFFFF
    return vmul(vload(table, (c & 511) << 3), vload(signs, (c >> 9) << 3))


@nb.njit(parallel=True, fastmath=True)
def indexed_1(x, k, codes, scale, table, signs, out):  # noqa: ANN001
    n_rows = out.shape[1]
    for n in nb.prange(n_rows):
        a0 = vzero()
        a1 = vzero()
        v = 0
        while v + 1 < k // 8:
            a0 = vfma(_e8p_2d(codes, n, v, table, signs), vload(x, v << 3), a0)
            a1 = vfma(_e8p_2d(codes, n, v + 1, table, signs), vload(x, (v + 1) << 3), a1)
            v += 2
        out[0, n] += scale[n, 0] * vsum(vadd(a0, a1))


@nb.njit(parallel=True, fastmath=True)
def indexed_2(x, k, codes0, scale0, table0, codes1, scale1, table1, signs, out):  # noqa: ANN001
    n_rows = out.shape[1]
    for n in nb.prange(n_rows):
        a0 = vzero()
        a1 = vzero()
        for v in range(k // 8):
            xv = vload(x, v << 3)
            a0 = vfma(_e8p_2d(codes0, n, v, table0, signs), xv, a0)
            a1 = vfma(vload(table1, np.int32(codes1[n, v]) << 3), xv, a1)
        out[0, n] += scale0[n, 0] * vsum(a0) + scale1[n, 0] * vsum(a1)


@nb.njit(inline="always")
def _e8p(codes, at, table, signs):  # noqa: ANN001, ANN202
    c = np.int32(sload(codes, at)) & 0xFFFF
    return vmul(vload(table, (c & 511) << 3), vload(signs, (c >> 9) << 3))


@nb.njit(parallel=True, fastmath=True)
def one_row_1(x, k, codes, scale, table, signs, out):  # noqa: ANN001
    n_rows, cols = out.shape[1], k // 8
    for n in nb.prange(n_rows):
        a = vzero()
        for v in range(cols):
            a = vfma(_e8p(codes, n * cols + v, table, signs), vload(x, v << 3), a)
        out[0, n] += hload(scale, n) * vsum(a)


@nb.njit(parallel=True, fastmath=True)
def one_row_2(x, k, codes0, scale0, table0, codes1, scale1, table1, signs, out):  # noqa: ANN001
    n_rows, cols = out.shape[1], k // 8
    for n in nb.prange(n_rows):
        a0 = vzero()
        a1 = vzero()
        for v in range(cols):
            xv = vload(x, v << 3)
            a0 = vfma(_e8p(codes0, n * cols + v, table0, signs), xv, a0)
            a1 = vfma(vload(table1, np.int32(sload(codes1, n * cols + v)) << 3), xv, a1)
        out[0, n] += hload(scale0, n) * vsum(a0) + hload(scale1, n) * vsum(a1)


@nb.njit(parallel=True, fastmath=True)
def four_chains_1(x, k, codes, scale, table, signs, out):  # noqa: ANN001
    n_rows, cols = out.shape[1], k // 8
    for n in nb.prange(n_rows):
        r = n * cols
        a0 = vzero()
        a1 = vzero()
        a2 = vzero()
        a3 = vzero()
        for v in range(0, cols, 4):  # the bench's shapes have a multiple of four codes per row
            a0 = vfma(_e8p(codes, r + v, table, signs), vload(x, v << 3), a0)
            a1 = vfma(_e8p(codes, r + v + 1, table, signs), vload(x, (v + 1) << 3), a1)
            a2 = vfma(_e8p(codes, r + v + 2, table, signs), vload(x, (v + 2) << 3), a2)
            a3 = vfma(_e8p(codes, r + v + 3, table, signs), vload(x, (v + 3) << 3), a3)
        out[0, n] += hload(scale, n) * vsum(vadd(vadd(a0, a1), vadd(a2, a3)))


@nb.njit(parallel=True, fastmath=True)
def four_chains_2(x, k, codes0, scale0, table0, codes1, scale1, table1, signs, out):  # noqa: ANN001
    n_rows, cols = out.shape[1], k // 8
    for n in nb.prange(n_rows):
        r = n * cols
        a0 = vzero()
        a1 = vzero()
        a2 = vzero()
        a3 = vzero()
        b0 = vzero()
        b1 = vzero()
        b2 = vzero()
        b3 = vzero()
        for v in range(0, cols, 4):
            x0 = vload(x, v << 3)
            x1 = vload(x, (v + 1) << 3)
            x2 = vload(x, (v + 2) << 3)
            x3 = vload(x, (v + 3) << 3)
            a0 = vfma(_e8p(codes0, r + v, table0, signs), x0, a0)
            a1 = vfma(_e8p(codes0, r + v + 1, table0, signs), x1, a1)
            a2 = vfma(_e8p(codes0, r + v + 2, table0, signs), x2, a2)
            a3 = vfma(_e8p(codes0, r + v + 3, table0, signs), x3, a3)
            b0 = vfma(vload(table1, np.int32(sload(codes1, r + v)) << 3), x0, b0)
            b1 = vfma(vload(table1, np.int32(sload(codes1, r + v + 1)) << 3), x1, b1)
            b2 = vfma(vload(table1, np.int32(sload(codes1, r + v + 2)) << 3), x2, b2)
            b3 = vfma(vload(table1, np.int32(sload(codes1, r + v + 3)) << 3), x3, b3)
        out[0, n] += (hload(scale0, n) * vsum(vadd(vadd(a0, a1), vadd(a2, a3)))
                      + hload(scale1, n) * vsum(vadd(vadd(b0, b1), vadd(b2, b3))))


@nb.njit(parallel=True, fastmath=True)
def offsets_1(x, k, codes, scale, table, signs, out, chunks):  # noqa: ANN001
    n_rows, cols = out.shape[1], k // 8
    per_chunk = (n_rows + chunks - 1) // chunks
    for ch in nb.prange(chunks):
        io = np.empty(_SCRATCH, np.int32)
        so = np.empty(_SCRATCH, np.int32)
        for n in range(ch * per_chunk, min(n_rows, (ch + 1) * per_chunk)):
            a = vzero()
            for v0 in range(0, cols, _SCRATCH):
                m = min(_SCRATCH, cols - v0)
                for j in range(m):
                    c = np.int32(sload(codes, n * cols + v0 + j)) & 0xFFFF
                    io[j] = (c & 511) << 3
                    so[j] = (c >> 9) << 3
                for j in range(m):
                    a = vfma(vmul(vload(table, io[j]), vload(signs, so[j])), vload(x, (v0 + j) << 3), a)
            out[0, n] += hload(scale, n) * vsum(a)


@nb.njit(parallel=True, fastmath=True)
def offsets_2(x, k, codes0, scale0, table0, codes1, scale1, table1, signs, out, chunks):  # noqa: ANN001
    n_rows, cols = out.shape[1], k // 8
    per_chunk = (n_rows + chunks - 1) // chunks
    for ch in nb.prange(chunks):
        io = np.empty(_SCRATCH, np.int32)
        so = np.empty(_SCRATCH, np.int32)
        jo = np.empty(_SCRATCH, np.int32)
        for n in range(ch * per_chunk, min(n_rows, (ch + 1) * per_chunk)):
            a0 = vzero()
            a1 = vzero()
            for v0 in range(0, cols, _SCRATCH):
                m = min(_SCRATCH, cols - v0)
                for j in range(m):
                    c = np.int32(sload(codes0, n * cols + v0 + j)) & 0xFFFF
                    io[j] = (c & 511) << 3
                    so[j] = (c >> 9) << 3
                    jo[j] = np.int32(sload(codes1, n * cols + v0 + j)) << 3
                for j in range(m):
                    xv = vload(x, (v0 + j) << 3)
                    a0 = vfma(vmul(vload(table0, io[j]), vload(signs, so[j])), xv, a0)
                    a1 = vfma(vload(table1, jo[j]), xv, a1)
            out[0, n] += hload(scale0, n) * vsum(a0) + hload(scale1, n) * vsum(a1)


def _layer(n: int, k: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal(k).astype(np.float32),
            "c0": rng.integers(-32768, 32768, (n, k // 8)).astype(np.int16),
            "c1": rng.integers(0, 256, (n, k // 8)).astype(np.uint8),
            "s0": (0.005 + 0.005 * rng.random((n, 1))).astype(np.float16),
            "s1": (0.005 + 0.005 * rng.random((n, 1))).astype(np.float16),
            "t0": rng.standard_normal(512 * 8).astype(np.float32),
            "t1": rng.standard_normal(256 * 8).astype(np.float32)}


def _views(L: dict[str, np.ndarray], k: int) -> dict[str, np.ndarray]:
    """``L`` plus the flat codes and the scales' fp16 bits the flat kernels take and the int8 form's
    arrays (made once, not per call)."""
    return {**L, **{f"{c}f": L[c].reshape(-1) for c in ("c0", "c1")},
            **{f"{s}b": L[s].view(np.int16).reshape(-1) for s in ("s0", "s1")},
            **(int8_simd.prepare(L, k) if int8_simd.available() else {})}


def _call(variant: str, stages: int, L: dict, k: int, out: np.ndarray) -> None:
    S = cn._SIGNS
    flat = {c: L[f"{c}f"] for c in ("c0", "c1")}
    bits = {s: L[f"{s}b"] for s in ("s0", "s1")}
    if variant == "product":
        if stages == 1:
            cn._GEMV[0](L["x"], cn._NO_SIGNS, 0, L["x"], k, flat["c0"], bits["s0"], L["t0"], S, out)
        else:
            cn._GEMV2[1](L["x"], cn._NO_SIGNS, 0, L["x"], k, flat["c0"], bits["s0"], L["t0"], flat["c1"], bits["s1"], L["t1"], S, out)
    elif variant == "indexed":
        f32 = {s: L[s].astype(np.float32) for s in ("s0", "s1")}  # the per-call conversion it made
        if stages == 1:
            indexed_1(L["x"], k, L["c0"], f32["s0"], L["t0"], S, out)
        else:
            indexed_2(L["x"], k, L["c0"], f32["s0"], L["t0"], L["c1"], f32["s1"], L["t1"], S, out)
    elif variant == "one row":
        if stages == 1:
            one_row_1(L["x"], k, flat["c0"], bits["s0"], L["t0"], S, out)
        else:
            one_row_2(L["x"], k, flat["c0"], bits["s0"], L["t0"], flat["c1"], bits["s1"], L["t1"], S, out)
    elif variant in ("int8 VNNI", "no table reads"):
        int8_simd.gemv(L, k, stages, _SIGN_BYTES, out, first_row_only=variant == "no table reads")
    elif variant == "four chains":
        if stages == 1:
            four_chains_1(L["x"], k, flat["c0"], bits["s0"], L["t0"], S, out)
        else:
            four_chains_2(L["x"], k, flat["c0"], bits["s0"], L["t0"], flat["c1"], bits["s1"], L["t1"], S, out)
    else:
        chunks = 4 * nb.get_num_threads()
        if stages == 1:
            offsets_1(L["x"], k, flat["c0"], bits["s0"], L["t0"], S, out, chunks)
        else:
            offsets_2(L["x"], k, flat["c0"], bits["s0"], L["t0"], flat["c1"], bits["s1"], L["t1"], S, out, chunks)


VARIANTS = ["product", "one row", "four chains", "indexed", "16 offsets"]
_INT8 = ["int8 VNNI", "no table reads"]
_SIGN_BYTES = int8_simd.sign_bytes(cn._SIGNS.reshape(128, 8))


def rows(shapes: list[tuple[int, int]], rounds: int, stream_bytes: int) -> list[dict]:
    out = []
    variants = VARIANTS + (_INT8 if int8_simd.available() else [])
    for k, n in shapes:
        for stages, preset in ((1, "v2-2"), (2, "v2-3")):
            nbytes = n * k * (2 if stages == 1 else 3) // 8
            layers = [_views(_layer(n, k, s), k) for s in range(max(2, -(-stream_bytes // nbytes)))]
            ref = np.zeros((1, n), np.float32)
            _call("product", stages, layers[0], k, ref)
            errors = {}
            for v in variants[1:]:
                got = np.zeros((1, n), np.float32)
                _call(v, stages, layers[0], k, got)
                errors[v] = err = float(np.abs(got - ref).max() / np.abs(ref).max())
                tol = None if v == "no table reads" else INT8_TOLERANCE if v == "int8 VNNI" else 1e-5
                if tol is not None and err > tol:
                    raise AssertionError(f"{v} differs from the product kernel by {err:.2e} ({preset}, {k}x{n})")
            times: dict[str, list[float]] = {v: [] for v in variants}
            for r in range(rounds + 1):  # the first round warms up (JIT)
                for v in variants:
                    t0 = time.perf_counter()
                    for L in layers:
                        _call(v, stages, L, k, np.zeros((1, n), np.float32))
                    if r:
                        times[v].append((time.perf_counter() - t0) / len(layers))
            us = {v: statistics.median(t) * 1e6 for v, t in times.items()}
            row = {"in": k, "out": n, "preset": preset, "copies": len(layers),
                   **{f"{v}_us": us[v] for v in variants},
                   **{f"{v}_vs_product": us[v] / us["product"] for v in variants},
                   **({"int8_error": errors["int8 VNNI"]} if "int8 VNNI" in errors else {})}
            logging.info("%s", row)
            out.append(row)
    return out


def table(res: dict) -> str:
    m = res["meta"]
    variants = [v for v in VARIANTS + _INT8 if f"{v}_us" in res["rows"][0]]
    lines = [f"`{m['command']}` on {m['machine']}, numba {m['numba_threads']} threads, load average before "
             f"{m['load_before']}, after {m['load_after']}, {m['date']}", "",
             "GEMV at M = 1, weights streamed: microseconds per call (time relative to the product kernel):", "",
             "| in x out | preset | " + " | ".join(variants) + " |", "|---|---|" + "---|" * len(variants)]
    for r in res["rows"]:
        lines.append(f"| {r['in']}x{r['out']} | {r['preset']} | " + " | ".join(
            f"{r[f'{v}_us']:.0f} ({r[f'{v}_vs_product']:.2f})" for v in variants) + " |")
    if "int8_error" in res["rows"][0]:
        lines += ["", "Largest int8 error relative to the largest output: " + ", ".join(
            f"{r['in']}x{r['out']} {r['preset']} {r['int8_error']:.4f}" for r in res["rows"])]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes: checks the script only")
    ap.add_argument("--out", default=None, help="default: results/cpu_kernel_variants (runs/... with --smoke)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    nb.set_num_threads(args.threads)
    load_before = "%.2f %.2f %.2f" % os.getloadavg()
    data = rows([(64, 24)], 1, 2**16) if args.smoke else rows(SHAPES, args.rounds, STREAM_BYTES)
    meta = {**run_meta(), "numba_threads": nb.get_num_threads(), "load_before": load_before,
            "load_after": "%.2f %.2f %.2f" % os.getloadavg()}
    res = {"meta": meta, "rows": data}
    out = args.out or ("runs/cpu_kernel_variants_smoke" if args.smoke else "results/cpu_kernel_variants")
    write_results(out, meta, data, table(res))
    print(table(res))


if __name__ == "__main__":
    main()
