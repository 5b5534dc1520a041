"""CPU speed of RBE layers and models against torch fp32 and bf16, as a fraction of this machine's
memory bandwidth.

    python bench/cpu_speed.py                  # results/cpu_speed.{json,md} (half an hour or more on 2 cores)
    python bench/cpu_speed.py --smoke          # tiny shapes and models: checks the script only

Bandwidth: a STREAM-like figure measured first, in the same process (the bench's threads,
arrays 5x the last-level cache): copy and triad with torch, and a read-only pass (the sum of an
array by a numba kernel: what a GEMV does to its weights). The denominator of every "% of
bandwidth" is the largest of these or, where a torch GEMV read its weights faster (it can, on a
shared VM), that rate: none flatters a kernel. Machine state: one fixed torch product in fp32 and
bf16 timed at the start, between the parts and at the end (``state_probe``), since on a virtual
machine torch's bf16 products moved by 2x between moments while fp32's held.

Layers: ``y = x W^T`` at M = 1 (decoding) for SmolLM2's 576->1536 and 1536->576 and the layer
shapes of an 8B model (4096x4096, 4096x14336, 14336x4096). Every timing cycles through enough
copies of the layer (fp32 or bf16 weights, or RBE codes) that they fill ``STREAM_BYTES`` (several
times the last-level cache): the weights come from memory, not cache, as in decoding a model
bigger than the cache. RBE layers hold random codes and scales (a kernel's cost does not depend
on the code values, and encoding 8B-sized layers would take most of the run). Candidates are
timed side by side, round-robin, in this one process; a row reports the median round.

SmolLM2-135M (offline, ``hf_rbe.data.smollm2_path``) in fp32, bf16 and every preset (quantized
without calibration: codes cost the same to decode either way; embedding and tied head in fp32
as loaded, once more with ``embedding_dtype="bfloat16"`` (v2-3 and v2-b3: computing in fp32, in
bf16, and in fp32 with ``prefill_dtype="bfloat16"``) and once with ``quantize_embeddings=True``:
the head RBE-coded, the embedding reading its rows), greedy, batch 1. Decode tokens/s =
``(N - 1) / (t(generate N) - t(generate 1))`` from a 16-token prompt; prefill tokens/s = 512 / one
forward over 512 tokens. Medians of ``--repeats``.

8B-shaped decoder: Llama-3-8B's shapes (width 4096, MLP 14336, 32 heads, 8 KV heads, vocabulary
128256) with random weights, bf16, built with 1 and with 5 decoder layers (embedding shared); in
the RBE models (v2-3, v2-b2, v2-b3) every decoder Linear and the head are v2 layers of the preset
with random codes computing in bf16 (the head as ``quantize_embeddings=True`` codes it, and as
llama.cpp's files code theirs), torch's bf16 model keeps a bf16 head. A decoding step (one token on
a KV cache, after a 4-token prompt) is timed directly, the median of 12 round-robin steps; its time
is ``fixed + layers * per_layer``: the two depths give both terms, and tokens/s at 32 layers is
extrapolated from them.

llama.cpp (``bench/llama_cpp_rows.py``): where ``llama-cpp-python`` and ``gguf`` are installed, the
SmolLM2 and 8B-shaped decoder rows get llama.cpp's Q4_K_M, Q3_K_M and IQ3_S files beside them, in
the same process, timed in a round-robin of their own after the others with their sessions open
only then (open, they slowed the numba rows: ``_llama_seconds``; ``--llama-cpp off`` leaves them
out; the GGUF files are made once, before any timing, and kept in ``--gguf-dir``). Format-v1 presets have no CPU kernel yet (the
PyTorch reference decodes every weight on every call); ``--v1`` adds them to the layer rows.
"""

from __future__ import annotations

import argparse
import copy
import gc
import logging
import os
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import llama_cpp_rows
import numba
import numpy as np
import torch
import torch.nn.functional as F

from hf_rbe import RBEConfig, RBELinear
from hf_rbe.core.packed import packed_size
from hf_rbe.core.rbe_codecs import codec_for
from hf_rbe.evaluation import llama_cpp
from hf_rbe.evaluation.results import run_meta, write_results
from hf_rbe.hf.calibration import heap
from hf_rbe.hf.config import PRESETS
from hf_rbe.kernels.cpu_simd import vadd, vload, vsum, vzero

SHAPES = [(576, 1536), (1536, 576), (4096, 4096), (4096, 14336), (14336, 4096)]  # (in_features, out_features)
ACCEPT_SHAPES = [(4096, 14336), (14336, 4096)]
STREAM_BYTES = 1024 * 2**20  # the layers' copies: ~10x this machine's 105 MiB L3
BANDWIDTH_BYTES = 512 * 2**20  # one STREAM array
V2_PRESETS = sorted((p for p, v in PRESETS.items() if v.get("format_version") == 2),
                    key=lambda p: (p.startswith("v2-b"), float(p[3:].lstrip("b"))))  # e8p presets, then the b1 ones
V1_PRESETS = sorted((p for p, v in PRESETS.items() if p.startswith("rbe-")), key=lambda p: float(p[4:]))
ACCEPT_PRESET = "v2-3"
ACCEPT_EMB = f"{ACCEPT_PRESET} + bf16 embeddings"
ACCEPT_BF16 = f"{ACCEPT_PRESET} + bf16 embeddings, bf16 activations"
ACCEPT_PREFILL = f"{ACCEPT_PRESET} + bf16 embeddings, bf16 prefill"  # RBEConfig(prefill_dtype="bfloat16")
BANDWIDTH_PRESETS = ["v2-2", "v2-2.5", "v2-3"]
SIGN_PRESETS = ["v2-b2", "v2-b3", "v2-b4"]  # sign planes: reported beside the presets, not instead
SIGN_PRESET = "v2-b3"  # the sign-plane stack of the acceptance preset's bits
SIGN_EMB = f"{SIGN_PRESET} + bf16 embeddings"
SIGN_BF16 = f"{SIGN_EMB}, bf16 activations"
SIGN_PREFILL = f"{SIGN_EMB}, bf16 prefill"
#: the SmolLM2 settings the verdicts read: (row's name suffix, verdict key suffix, how the table says it)
SETTINGS = (("", "", "fp32 activations"), (", bf16 activations", "_bf16_activations", "bf16 activations"),
            (", bf16 prefill", "_bf16_prefill", "fp32 activations and bf16 prefill products"))
HALF_X = " (bf16 x)"  # a layer column of bf16 activations: the layer computes in its input's dtype, as torch's bf16 row does
HALF_X_PRESETS = [ACCEPT_PRESET, *SIGN_PRESETS]
DECODER_PRESETS = [ACCEPT_PRESET, "v2-b2", SIGN_PRESET]
DECODER_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                  vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0)
DEPTHS_8B = (1, 5)  # four layers apart: the per-layer term is their difference
LAYERS_8B = 32
LLAMA_REFERENCE = "llama.cpp Q4_K_M"  # the row issue #28's 8B-shaped decoder must beat
TARGETS = {"bandwidth_fraction": 0.7, "layer_vs_bf16": 3.0, "decode_vs_bf16": 1.3, "prefill_vs_bf16": 0.8,
           "decoder_8b_vs_bf16": 3.0}


def timed_rounds(cands: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """Seconds of each candidate's call in every round, timed round-robin so load hits them alike
    (after one warm-up call each: JIT, allocator)."""
    for f in cands.values():
        f()
    times: dict[str, list[float]] = {k: [] for k in cands}
    for _ in range(rounds):
        for k, f in cands.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return times


def median_rounds(cands: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median seconds per call of each candidate (``timed_rounds``)."""
    return {k: statistics.median(v) for k, v in timed_rounds(cands, rounds).items()}


@numba.njit(parallel=True, fastmath=True, cache=True)
def _read(a: np.ndarray, chunks: int) -> float:
    """Sum of ``a`` in ``chunks`` parallel pieces, four 8-lane accumulators each: a pure streaming read."""
    per = a.shape[0] // chunks
    total = 0.0
    for c in numba.prange(chunks):
        s0 = vzero()
        s1 = vzero()
        s2 = vzero()
        s3 = vzero()
        for i in range(c * per, (c + 1) * per, 32):
            s0 = vadd(s0, vload(a, i))
            s1 = vadd(s1, vload(a, i + 8))
            s2 = vadd(s2, vload(a, i + 16))
            s3 = vadd(s3, vload(a, i + 24))
        total += vsum(vadd(vadd(s0, s1), vadd(s2, s3)))
    return total


def bandwidth(nbytes: int, rounds: int) -> dict[str, float]:
    """STREAM-like GB/s of this machine (best round, as STREAM reports): copy (``b = a``, 2 arrays
    moved) and triad (``a = b + s c``, 3) with torch, and read (the sum of one array by a numba
    kernel: the one way a GEMV touches its weights)."""
    n = nbytes // 4 // 4096 * 4096
    a, b, c = torch.rand(n), torch.rand(n), torch.rand(n)
    chunks = 64 * numba.get_num_threads()
    kernels = {"copy": (lambda: b.copy_(a), 2), "triad": (lambda: torch.add(b, c, alpha=3.0, out=a), 3),
               "read": (lambda: _read(a.numpy(), chunks), 1)}
    out = {}
    for name, (f, arrays) in kernels.items():
        f()
        best = min(_seconds(f) for _ in range(rounds))
        out[f"{name}_gbs"] = arrays * n * 4 / best / 1e9
    out["gbs"] = max(out.values())
    logging.info("bandwidth %s", out)
    return out


def state_probe(at: str) -> dict[str, object]:
    """Microseconds of one fixed torch product (512x576 by 576x1536, a SmolLM2 prefill's shape) in
    fp32 and bf16, median of 30: on a virtual machine torch's bf16 products (AMX) ran 2x slower in
    some processes and moments than in others while fp32's held (``hf_rbe/kernels/NOTES.md``), so
    the bench records where it stood between its parts."""
    out: dict[str, object] = {"at": at}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a, b = torch.randn(512, 576, dtype=dtype), torch.randn(1536, 576, dtype=dtype)
        a @ b.T
        out[f"{name}_us"] = statistics.median(_seconds(lambda: a @ b.T) for _ in range(30)) * 1e6
    logging.info("state %s", out)
    return out


def _seconds(f: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    f()
    return time.perf_counter() - t0


def _copies(nbytes: int, stream_bytes: int) -> int:
    return max(2, -(-stream_bytes // nbytes))


def random_rbe_layer(spec: object, k: int, n: int, seed: int, dtype: torch.dtype = torch.float32) -> RBELinear:
    """A v2 layer of the given spec with uniformly random codes and scales in [0.005, 0.01]
    (the universal tables, a random rotation seed): what the kernels read, without an encoder run."""
    g = torch.Generator().manual_seed(seed)
    layer = RBELinear(k, n, False, spec, table_key=codec_for(spec).table_key(spec), compute_dtype=dtype)
    packed = {}
    for name, ts in spec.tensors(n, k).items():
        if name == "rotation_seed":
            packed[name] = torch.tensor([seed], dtype=torch.int64)
        elif ts.dtype.is_floating_point:
            packed[name] = (0.005 + 0.005 * torch.rand(ts.shape, generator=g)).to(ts.dtype)
        else:
            info = torch.iinfo(ts.dtype)
            packed[name] = torch.randint(info.min, info.max + 1, ts.shape, generator=g, dtype=torch.int64).to(ts.dtype)
    layer.load_packed(packed)
    return layer


def _hand_back_freed_memory() -> None:
    """Return the C heap's freed pages to the system (``heap.trim``, calibration's): each shape's layer
    rows make and drop thousands of layer copies and their kernel plans, whose freed memory glibc
    otherwise keeps, and the next shape and the 8B-shaped decoder's models need it."""
    gc.collect()
    heap.trim(0)


def layer_rows(shapes: list[tuple[int, int]], presets: list[str], rounds: int, stream_bytes: int) -> list[dict]:
    """Every candidate cycles through its own copies, ``stream_bytes`` of them in all (fp32's and
    each RBE preset's alike), so that none of them runs from cache. The layers of
    ``HALF_X_PRESETS`` also run on bf16 activations (``HALF_X`` columns, the same copies)."""
    rows = []
    for k, n in shapes:
        torch.manual_seed(0)
        w = torch.randn(n, k) / k**0.5
        x = torch.randn(1, k)
        xb = x.bfloat16()
        weights = {"fp32": [w.clone() for _ in range(_copies(4 * n * k, stream_bytes))],
                   "bf16": [w.bfloat16() for _ in range(_copies(2 * n * k, stream_bytes))]}
        del w
        cands: dict[str, Callable[[], object]] = {
            "fp32": lambda ws=weights["fp32"]: [F.linear(x, w) for w in ws],
            "bf16": lambda ws=weights["bf16"]: [F.linear(xb, w) for w in ws]}
        copies = {c: len(w) for c, w in weights.items()}
        nbytes = {"fp32": 4 * n * k, "bf16": 2 * n * k}
        bpw = {}
        for name in presets:
            spec = RBEConfig.from_preset(name).base_spec()
            q = random_rbe_layer(spec, k, n, seed=1)
            nbytes[name] = q.storage_bits(include_tables=False) // 8
            clones = [q] + [copy.deepcopy(q) for _ in range(_copies(nbytes[name], stream_bytes) - 1)]
            bpw[name], copies[name] = q.bits_per_weight, len(clones)
            cands[name] = lambda clones=clones: [c(x) for c in clones]
            if name in HALF_X_PRESETS:  # the same layers (no bias) on bf16 input compute in bf16
                half = name + HALF_X
                nbytes[half], bpw[half], copies[half] = nbytes[name], bpw[name], copies[name]
                cands[half] = lambda clones=clones: [c(xb) for c in clones]
        secs = {c: t / copies[c] for c, t in median_rounds(cands, rounds).items()}
        row = {"in": k, "out": n, "M": 1, "copies": copies,
               **{f"{c}_us": secs[c] * 1e6 for c in cands},
               **{f"{c}_gbs": nbytes[c] / secs[c] / 1e9 for c in cands},
               **{f"{c}_speedup": secs["fp32"] / secs[c] for c in cands if c != "fp32"},
               **{f"{c}_vs_bf16": secs["bf16"] / secs[c] for c in cands if c not in ("fp32", "bf16")},
               **{f"{c}_bpw": b for c, b in bpw.items()}}
        rows.append(row)
        logging.info("%s", row)
        del weights, cands
        _hand_back_freed_memory()
    return rows


def smollm2_loader(smoke: bool) -> Callable[[RBEConfig | None, torch.dtype], torch.nn.Module]:
    """``load(config, dtype)``: SmolLM2-135M (offline) quantized by ``config`` or left as is; with
    ``smoke``, a tiny random Llama instead (the same random weights every call)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if smoke:
        cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=256)

        def tiny(qc: RBEConfig | None, dtype: torch.dtype) -> torch.nn.Module:
            torch.manual_seed(0)
            model = LlamaForCausalLM(cfg).to(dtype)
            if qc is not None:
                from hf_rbe import quantize_model

                quantize_model(model, qc)
            return model

        return tiny
    from hf_rbe.data import smollm2_path

    path = smollm2_path()
    return lambda qc, dtype: AutoModelForCausalLM.from_pretrained(path, dtype=dtype, quantization_config=qc)


def _models(smoke: bool, presets: list[str]) -> dict[str, torch.nn.Module]:
    load = smollm2_loader(smoke)
    models = {"fp32": load(None, torch.float32), "bf16": load(None, torch.bfloat16)}
    for name in presets:
        models[name] = load(RBEConfig.from_preset(name), torch.float32)
    # the acceptance preset with the embedding and tied head stored (and multiplied) in bf16 ...
    accept = models[ACCEPT_EMB] = load(RBEConfig.from_preset(ACCEPT_PRESET, embedding_dtype="bfloat16"), torch.float32)
    # ... the same model computing in bf16, as torch's bf16 model does (its codes are unchanged) ...
    models[ACCEPT_BF16] = copy.deepcopy(accept).to(torch.bfloat16)
    # ... and in fp32 with a prompt's products in bf16 (the same codes again: encoding is deterministic)
    models[ACCEPT_PREFILL] = load(RBEConfig.from_preset(ACCEPT_PRESET, embedding_dtype="bfloat16",
                                                        prefill_dtype="bfloat16"), torch.float32)
    if SIGN_PRESET in presets:  # the sign-plane stack of the same bits, embedding and head as above
        models[SIGN_EMB] = load(RBEConfig.from_preset(SIGN_PRESET, embedding_dtype="bfloat16"), torch.float32)
        models[SIGN_BF16] = copy.deepcopy(models[SIGN_EMB]).to(torch.bfloat16)
        models[SIGN_PREFILL] = load(RBEConfig.from_preset(SIGN_PRESET, embedding_dtype="bfloat16",
                                                          prefill_dtype="bfloat16"), torch.float32)
    if ACCEPT_PRESET in presets:  # ... or the head RBE-coded too, the tied embedding decoding its rows from the head's codes
        models[f"{ACCEPT_PRESET} + RBE head and embedding"] = load(
            RBEConfig.from_preset(ACCEPT_PRESET, quantize_embeddings=True), torch.float32)
    return {k: m.eval() for k, m in models.items()}


def _timings(models: dict[str, torch.nn.Module], new_tokens: int, prefill: int | None,
             repeats: int, llama: dict[str, Path] | None = None, threads: int = 2,
             repack: bool = False) -> dict[str, float]:
    """Median seconds of ``generate`` 1 and N tokens (and a ``prefill``-token forward) per model,
    round-robin; then the same for a llama.cpp session per GGUF file in ``llama`` (``_llama_seconds``)."""
    vocab = next(iter(models.values())).config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (1, 16), generator=g)
    long = torch.randint(0, vocab, (1, prefill or 1), generator=g)

    def gen(model: torch.nn.Module, n: int) -> Callable[[], object]:
        return lambda: model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                                      min_new_tokens=n, do_sample=False, pad_token_id=0)

    cands: dict[str, Callable[[], object]] = {}
    for name, m in models.items():
        cands[f"{name}/gen1"] = gen(m, 1)
        cands[f"{name}/genN"] = gen(m, new_tokens)
        if prefill:
            cands[f"{name}/prefill"] = lambda m=m: m(long)
    secs = median_rounds(cands, repeats)
    secs.update(_llama_seconds(
        {f"llama.cpp {t}": p for t, p in (llama or {}).items()}, threads, (prefill or 0) + new_tokens + 32, repack,
        lambda ss: llama_cpp_rows.model_candidates(ss, prompt[0].tolist(), new_tokens, long[0].tolist()), repeats))
    return secs


def _llama_seconds(files: dict[str, Path], threads: int, n_ctx: int, repack: bool,
                   candidates: Callable[[dict[str, llama_cpp.Session]], dict[str, Callable[[], object]]],
                   rounds: int) -> dict[str, float]:
    """Median seconds of llama.cpp's ``candidates``, a session per GGUF file, round-robin among
    themselves, after the other rows, the sessions open only for it: with llama.cpp's sessions
    open in the process the numba kernels' rows ran slower (SmolLM2 v2-3 decoded 28.1 tokens/s
    beside them, 33.2 without, torch's rows unchanged), which would have timed the neighbour, not
    the kernel."""
    sessions = {name: llama_cpp.Session(p, threads, n_ctx, repack) for name, p in files.items()}
    try:
        return median_rounds(candidates(sessions), rounds) if sessions else {}
    finally:
        for s in sessions.values():
            s.close()


@torch.inference_mode()
def model_rows(smoke: bool, presets: list[str], new_tokens: int, prefill: int, repeats: int,
               llama: dict[str, Path] | None = None, threads: int = 2, repack: bool = False) -> list[dict]:
    """SmolLM2's rows (and llama.cpp's, one per GGUF file in ``llama``)."""
    models = _models(smoke, presets)
    secs = _timings(models, new_tokens, prefill, repeats, llama, threads, repack)
    rows = []

    def rates(name: str) -> dict[str, float]:
        return {"decode_tokens_per_s": (new_tokens - 1) / (secs[f"{name}/genN"] - secs[f"{name}/gen1"]),
                "prefill_tokens_per_s": prefill / secs[f"{name}/prefill"]}

    for name, m in models.items():
        size = packed_size(m)
        rows.append({"weights": name, **rates(name),
                     "linear_bits_per_weight": size["bits_per_weight"] if size["rbe_layers"] else None,
                     "state_dict_mib": size["state_dict_bytes"] / 2**20})
        logging.info("%s", rows[-1])
    for t, path in (llama or {}).items():
        rows.append({"weights": f"llama.cpp {t}", **rates(f"llama.cpp {t}"), "repack": repack,
                     "linear_bits_per_weight": llama_cpp.linear_bits_per_weight(path),
                     "state_dict_mib": path.stat().st_size / 2**20})
        logging.info("%s", rows[-1])
    return rows


def _decoders(shape: dict, depths: tuple[int, ...], presets: list[str]) -> dict[tuple[str, int], torch.nn.Module]:
    """bf16 Llama decoders of ``shape`` at each depth with random weights, sharing one embedding
    and head; and the same with every decoder Linear and the head a random-code RBE layer of each
    preset (one head per preset, shared by its depths)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    vocab, width = shape["vocab_size"], shape["hidden_size"]
    embed = torch.nn.Embedding(vocab, width).to(torch.bfloat16)
    head = torch.nn.Linear(width, vocab, bias=False).to(torch.bfloat16)
    # an RBE model's head coded at its preset (quantize_embeddings=True), as llama.cpp codes its own
    coded = {name: random_rbe_layer(RBEConfig.from_preset(name).base_spec(), width, vocab, seed=99,
                                    dtype=torch.bfloat16) for name in presets}
    out = {}
    for depth in depths:
        for name in ["bf16", *presets]:
            # built with a tiny vocabulary (initializing 128256 rows per model is slow), then given the shared ones
            model = LlamaForCausalLM(LlamaConfig(**{**shape, "vocab_size": 8}, num_hidden_layers=depth,
                                                 tie_word_embeddings=False)).to(torch.bfloat16)
            model.model.embed_tokens, model.lm_head = embed, coded.get(name, head)
            model.config.vocab_size = vocab
            if name != "bf16":
                spec = RBEConfig.from_preset(name).base_spec()
                linears = [(n, m) for n, m in model.model.layers.named_modules() if isinstance(m, torch.nn.Linear)]
                for i, (lname, lin) in enumerate(linears):
                    model.model.layers.set_submodule(lname, random_rbe_layer(
                        spec, lin.in_features, lin.out_features, seed=i, dtype=torch.bfloat16))
            out[(name, depth)] = model.eval()
    return out


def _decode_steps(models: dict[str, torch.nn.Module], prompt_tokens: int, rounds: int) -> dict[str, float]:
    """Median seconds of one decoding step (a one-token forward on the model's growing KV cache) per
    model, round-robin. The prompt stays at a few tokens, so every Linear
    runs at batch 1 (the GEMV path) and no prefill enters the timing."""
    from transformers import DynamicCache

    state: dict[str, list] = {}
    for name, m in models.items():
        cache = DynamicCache(config=m.config)
        prompt = torch.arange(1, prompt_tokens + 1)[None]
        state[name] = [m(prompt, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1), cache]

    def step(name: str) -> Callable[[], object]:
        def run() -> None:
            tok, cache = state[name]
            state[name][0] = models[name](tok, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        return run

    return median_rounds({name: step(name) for name in models}, rounds)


@torch.inference_mode()
def decoder_rows(shape: dict, depths: tuple[int, ...], layers: int, presets: list[str], rounds: int,
                 llama: dict[tuple[str, int], Path] | None = None, threads: int = 2,
                 repack: bool = False) -> list[dict]:
    """Per-token time ``fixed + depth * per_layer`` of each model family, from two depths, and
    tokens/s extrapolated to ``layers`` decoder layers (llama.cpp's families from its GGUF files)."""
    models = _decoders(shape, depths, presets)
    secs = _decode_steps({f"{n}@{d}": m for (n, d), m in models.items()}, 4, rounds)
    lo, hi = depths
    heads = {name: m.lm_head for (name, d), m in models.items() if d == lo}  # llama.cpp's: its file's
    del models  # the torch models (several GB at 8B widths) are gone before llama.cpp's files load
    gc.collect()
    secs.update(_llama_seconds({f"llama.cpp {t}@{d}": p for (t, d), p in (llama or {}).items()}, threads,
                               4 + rounds + 8, repack, lambda ss: llama_cpp_rows.step_candidates(ss, 4), rounds))
    rows = []
    families = ["bf16", *presets, *dict.fromkeys(f"llama.cpp {t}" for t, _ in (llama or {}))]
    for name in families:
        per_token = {d: secs[f"{name}@{d}"] for d in depths}
        per_layer = (per_token[hi] - per_token[lo]) / (hi - lo)
        fixed = per_token[lo] - lo * per_layer
        head = heads.get(name)
        head_bpw = None if head is None else head.bits_per_weight if isinstance(head, RBELinear) else 16.0
        rows.append({"weights": name, "per_layer_ms": per_layer * 1e3, "fixed_ms": fixed * 1e3, "head_bpw": head_bpw,
                     **{f"tokens_per_s_{d}_layers": 1 / per_token[d] for d in depths},
                     f"tokens_per_s_{layers}_layers": 1 / (fixed + layers * per_layer)})
        logging.info("%s", rows[-1])
    bf16 = rows[0]
    for r in rows:
        r["vs_bf16"] = r[f"tokens_per_s_{layers}_layers"] / bf16[f"tokens_per_s_{layers}_layers"]
        r["per_layer_vs_bf16"] = bf16["per_layer_ms"] / r["per_layer_ms"]
    return rows


def add_fractions(rows: list[dict], bw: dict[str, float]) -> None:
    """Each layer's share of the machine's bandwidth. The denominator (``bw["peak_gbs"]``) is the
    STREAM-like figure, or the rate a torch GEMV read its weights at where that was higher (a
    STREAM-like pass can come out below what the memory delivers to a GEMV on a shared VM)."""
    torch_rates = [r[f"{c}_gbs"] for r in rows for c in ("fp32", "bf16")]
    bw["peak_gbs"] = max(bw["gbs"], *torch_rates)
    bw["peak_from"] = "STREAM-like" if bw["peak_gbs"] == bw["gbs"] else "torch GEMV"
    for r in rows:
        for key in [k for k in r if k.endswith("_gbs")]:
            r[key[:-4] + "_bandwidth_fraction"] = r[key] / bw["peak_gbs"]


def _geo_mean(xs: list[float]) -> float:
    return statistics.geometric_mean(xs)


def verdicts(res: dict) -> dict:
    """Issue #28's targets against this run (``TARGETS``); absent parts are left out."""
    out: dict = {"targets": TARGETS}
    big = [r for r in res["layers"] if (r["in"], r["out"]) in ACCEPT_SHAPES]
    if big:
        out["min_bandwidth_fraction"] = {p: min(r[f"{p}_bandwidth_fraction"] for r in big)
                                         for p in BANDWIDTH_PRESETS if f"{p}_us" in big[0]}
        if f"{ACCEPT_PRESET}_vs_bf16" in big[0]:
            out["min_layer_vs_bf16"] = min(r[f"{ACCEPT_PRESET}_vs_bf16"] for r in big)
    models = {r["weights"]: r for r in res.get("models", [])}
    for name, suffix, _ in SETTINGS:
        key = ACCEPT_EMB + name
        if key in models and "bf16" in models:
            for what in ("decode", "prefill"):
                out[f"{what}_vs_bf16{suffix}"] = (models[key][f"{what}_tokens_per_s"]
                                                  / models["bf16"][f"{what}_tokens_per_s"])
    dec = {r["weights"]: r for r in res.get("decoder_8b", [])}
    sign: dict = {}  # the same measures for the sign-plane presets, where present
    if big and all(f"{p}_us" in big[0] for p in SIGN_PRESETS):
        sign["min_bandwidth_fraction"] = {p: min(r[f"{p}_bandwidth_fraction"] for r in big) for p in SIGN_PRESETS}
        sign["min_layer_vs_bf16"] = {p: min(r[f"{p}_vs_bf16"] for r in big) for p in SIGN_PRESETS}
    if big and all(f"{p}{HALF_X}_us" in big[0] for p in SIGN_PRESETS):
        sign["min_layer_vs_bf16_bf16_x"] = {p: min(r[f"{p}{HALF_X}_vs_bf16"] for r in big) for p in SIGN_PRESETS}
        sign["min_bandwidth_fraction_bf16_x"] = {p: min(r[f"{p}{HALF_X}_bandwidth_fraction"] for r in big)
                                                 for p in SIGN_PRESETS}
    for name, suffix, _ in SETTINGS:
        key = SIGN_EMB + name
        if key in models and "bf16" in models:
            for what in ("decode", "prefill"):
                sign[f"{what}_vs_bf16{suffix}"] = (models[key][f"{what}_tokens_per_s"]
                                                   / models["bf16"][f"{what}_tokens_per_s"])
    if any(p in dec for p in SIGN_PRESETS):
        sign["decoder_8b_vs_bf16"] = {p: dec[p]["vs_bf16"] for p in SIGN_PRESETS if p in dec}
    if sign:
        out["sign_planes"] = sign
    if ACCEPT_PRESET in dec:
        out["decoder_8b_vs_bf16"] = dec[ACCEPT_PRESET]["vs_bf16"]
        if LLAMA_REFERENCE in dec:
            key = f"tokens_per_s_{res['decoder_8b_setup']['layers']}_layers"
            out["decoder_8b_vs_llama_cpp"] = dec[ACCEPT_PRESET][key] / dec[LLAMA_REFERENCE][key]
    return out


def table(res: dict) -> str:
    m, names = res["meta"], res.get("layer_columns", res["presets"])
    bw = res["bandwidth"]
    lines = [f"`{m['command']}` on {m['machine']}, numba {m['numba_threads']} threads, load average before "
             f"{m['load_before']}, after {m['load_after']}, {m['date']}"
             + (f", peak resident memory {m['peak_rss_gib']:.1f} GiB" if "peak_rss_gib" in m else ""), "",
             f"Bandwidth (STREAM-like, same process, best of rounds): copy {bw['copy_gbs']:.1f} GB/s, triad "
             f"{bw['triad_gbs']:.1f}, read {bw['read_gbs']:.1f}. The 100% below is **{bw['peak_gbs']:.1f} GB/s**: "
             + ("the largest of these." if bw["peak_from"] == "STREAM-like" else
                "the rate a torch GEMV read its weights at, above every STREAM-like figure."), "",
             *([("Machine state (one 512x576 by 576x1536 torch product, us, fp32 / bf16): "
                 + ", ".join(f"{p['at']} {p['fp32_us']:.0f} / {p['bf16_us']:.0f}" for p in res["state_probes"])
                 + ". Where the bf16 figure moves, ratios to torch bf16 in the rows between move with it."), ""]
               if "state_probes" in res else []),
             "Layer GEMV, M=1, weights streamed: microseconds per call (GB/s of weights read, % of bandwidth):", "",
             "| in x out | fp32 | bf16 | " + " | ".join(names) + " |", "|---|---|---|" + "---|" * len(names)]
    for r in res["layers"]:
        cells = [f"{r[f'{c}_us']:.0f} ({r[f'{c}_gbs']:.1f}, {100 * r[f'{c}_bandwidth_fraction']:.0f}%)"
                 for c in ["fp32", "bf16", *names]]
        lines.append(f"| {r['in']}x{r['out']} | " + " | ".join(cells) + " |")
    lines += ["", "Speedup over torch bf16 (over fp32 in brackets):", "",
              "| in x out | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for r in res["layers"]:
        lines.append(f"| {r['in']}x{r['out']} | " + " | ".join(
            f"{r[f'{s}_vs_bf16']:.2f}x ({r[f'{s}_speedup']:.2f}x)" for s in names) + " |")
    lc = res.get("llama_cpp")
    lines += ["", "SmolLM2-135M, batch 1, greedy" + ("" if not lc else
              f" (llama.cpp rows: llama-cpp-python {lc['version']}, weight repacking "
              f"{'on' if lc['repack'] else 'off: it crashed on this CPU'}, its own k-quant and i-quant "
              "types re-quantized from the packaged Q4_1 file, no imatrix)") + ":", "",
              "| weights | Linear bits/weight | state dict MiB | decode tokens/s | prefill tokens/s (512) |",
              "|---|---|---|---|---|"]
    for r in res["models"]:
        bpw = "-" if r["linear_bits_per_weight"] is None else f"{r['linear_bits_per_weight']:.2f}"
        lines.append(f"| {r['weights']} | {bpw} | {r['state_dict_mib']:.0f} | {r['decode_tokens_per_s']:.1f} | "
                     f"{r['prefill_tokens_per_s']:.0f} |")
    if res.get("decoder_8b"):
        d = res["decoder_8b_setup"]
        lines += ["", f"8B-shaped decoder (random weights, a head of {d['vocab_size']} rows: bf16 in torch's "
                  "model, coded at the preset in RBE's, llama.cpp's file type's own), one decoding step at batch 1; "
                  f"measured at {' and '.join(map(str, d['depths']))} layers, extrapolated to {d['layers']}:", "",
                  f"| weights | ms per layer | ms fixed (embedding, head) | tokens/s at {d['layers']} layers | "
                  "vs bf16 | per layer vs bf16 |", "|---|---|---|---|---|---|"]
        key = f"tokens_per_s_{d['layers']}_layers"
        for r in res["decoder_8b"]:
            lines.append(f"| {r['weights']} | {r['per_layer_ms']:.1f} | {r['fixed_ms']:.1f} | "
                         f"{r[key]:.2f} | {r['vs_bf16']:.2f}x | "
                         f"{r['per_layer_vs_bf16']:.2f}x |")
    v = res.get("verdicts", {})
    t = TARGETS
    parts = []
    if "min_bandwidth_fraction" in v:
        parts.append("bandwidth at 8B MLP shapes " + ", ".join(
            f"{p} {100 * f:.0f}%" for p, f in v["min_bandwidth_fraction"].items())
            + f" (target >= {100 * t['bandwidth_fraction']:.0f}%)")
    if "min_layer_vs_bf16" in v:
        parts.append(f"{ACCEPT_PRESET} layer {v['min_layer_vs_bf16']:.2f}x bf16 (target >= {t['layer_vs_bf16']}x)")
    for _, suffix, what in SETTINGS:
        if f"decode_vs_bf16{suffix}" in v:
            parts.append(f"SmolLM2 with {what}: decode {v[f'decode_vs_bf16{suffix}']:.2f}x bf16 (target "
                         f">= {t['decode_vs_bf16']}x), prefill {v[f'prefill_vs_bf16{suffix}']:.2f}x (target >= "
                         f"{t['prefill_vs_bf16']}x)")
    if "decoder_8b_vs_bf16" in v:
        parts.append(f"8B-shaped decoder {v['decoder_8b_vs_bf16']:.2f}x bf16 (target >= {t['decoder_8b_vs_bf16']}x)")
    if "decoder_8b_vs_llama_cpp" in v:
        parts.append(f"{v['decoder_8b_vs_llama_cpp']:.2f}x {LLAMA_REFERENCE} (target: ahead, > 1x)")
    if parts:
        lines += ["", f"Acceptance ({ACCEPT_PRESET}; with bf16 embeddings on SmolLM2): " + "; ".join(parts) + "."]
    if "sign_planes" in v:
        sp, sign = v["sign_planes"], []
        if "min_bandwidth_fraction" in sp:
            sign += ["bandwidth at 8B MLP shapes " + ", ".join(
                         f"{p} {100 * f:.0f}%" for p, f in sp["min_bandwidth_fraction"].items()),
                     "layer " + ", ".join(f"{p} {f:.2f}x" for p, f in sp["min_layer_vs_bf16"].items()) + " bf16"]
        if "min_layer_vs_bf16_bf16_x" in sp:
            sign.append("with bf16 activations layer " + ", ".join(
                f"{p} {f:.2f}x ({100 * sp['min_bandwidth_fraction_bf16_x'][p]:.0f}%)"
                for p, f in sp["min_layer_vs_bf16_bf16_x"].items()) + " bf16")
        for _, suffix, what in SETTINGS:
            if f"decode_vs_bf16{suffix}" in sp:
                sign.append(f"SmolLM2 {SIGN_EMB} with {what}: decode {sp[f'decode_vs_bf16{suffix}']:.2f}x "
                            f"bf16, prefill {sp[f'prefill_vs_bf16{suffix}']:.2f}x")
        if "decoder_8b_vs_bf16" in sp:
            sign.append("8B-shaped decoder " + ", ".join(f"{p} {f:.2f}x" for p, f in sp["decoder_8b_vs_bf16"].items())
                        + " bf16")
        lines += ["", "Sign planes (b1 stacks, the same targets for comparison): " + "; ".join(sign) + "."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=9, help="rounds of the layer timings")
    ap.add_argument("--repeats", type=int, default=7,
                    help="repeats of the model timings (a SmolLM2 decode rate moves by a tenth between rounds here)")
    ap.add_argument("--tokens", type=int, default=32, help="new tokens per decode timing")
    ap.add_argument("--v1", action="store_true", help="also the format-v1 presets (no CPU kernel: slow)")
    ap.add_argument("--model-presets", nargs="*", default=None,
                    help="presets of the SmolLM2 rows besides the acceptance ones (default: all v2 presets; "
                         "quantizing SmolLM2 takes minutes per preset)")
    ap.add_argument("--llama-cpp", choices=("auto", "off"), default="auto",
                    help="llama.cpp rows when llama-cpp-python and gguf are installed (default), or never")
    ap.add_argument("--gguf-dir", default="runs/llama_cpp", help="where llama.cpp's GGUF files are made and kept")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes and models: checks the script only")
    ap.add_argument("--out", default=None, help="default: results/cpu_speed (runs/cpu_speed_smoke with --smoke)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    numba.set_num_threads(args.threads)
    presets = V2_PRESETS + (V1_PRESETS if args.v1 else [])
    load_before = "%.2f %.2f %.2f" % os.getloadavg()
    llama = args.llama_cpp == "auto" and llama_cpp.available()
    gguf_dir = Path(args.gguf_dir) / ("smoke" if args.smoke else "full")
    gguf_dir.mkdir(parents=True, exist_ok=True)
    if args.smoke:
        shape, depths, n_layers = dict(DECODER_8B, hidden_size=256, intermediate_size=512, num_attention_heads=8,
                                       num_key_value_heads=2, vocab_size=256), (1, 2), 4
    else:
        shape, depths, n_layers = DECODER_8B, DEPTHS_8B, LAYERS_8B
    # llama.cpp's files first: quantizing is heavy work, kept out of every timing
    dec_files = llama_cpp_rows.decoder_files(gguf_dir, shape, depths, args.threads) if llama else None
    lm_files = llama_cpp_rows.smollm2_files(gguf_dir, args.threads) if llama and not args.smoke else None
    repack = llama and llama_cpp.repack_works(next(iter(dec_files.values())), args.threads)
    probes = [state_probe("start")]
    if args.smoke:
        bw = bandwidth(2**20, 2)
        layers = layer_rows([(256, 64)], presets, 2, 2**20)
        probes.append(state_probe("after the layer rows"))
        models = model_rows(True, presets, 3, 32, 1)
        probes.append(state_probe("after the model rows"))
        decoder = decoder_rows(shape, depths, n_layers, DECODER_PRESETS, 2, dec_files, args.threads, repack)
    else:
        bw = bandwidth(BANDWIDTH_BYTES, 10)
        layers = layer_rows(SHAPES, presets, args.rounds, STREAM_BYTES)
        probes.append(state_probe("after the layer rows"))
        model_presets = presets if args.model_presets is None else args.model_presets
        models = model_rows(False, model_presets, args.tokens, 512, args.repeats, lm_files, args.threads, repack)
        probes.append(state_probe("after the model rows"))
        _hand_back_freed_memory()
        decoder = decoder_rows(shape, depths, n_layers, DECODER_PRESETS, 12, dec_files, args.threads, repack)
    probes.append(state_probe("end"))
    add_fractions(layers, bw)
    meta = {**run_meta(), "numba_threads": numba.get_num_threads(), "load_before": load_before,
            "load_after": "%.2f %.2f %.2f" % os.getloadavg(),
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    res = {"meta": meta, "presets": presets, "bandwidth": bw, "state_probes": probes,
           "layer_columns": presets + [p + HALF_X for p in HALF_X_PRESETS if p in presets], "layers": layers, "models": models,
           "llama_cpp": {"version": llama_cpp.version(), "repack": repack} if llama else None,
           "decoder_8b_setup": {"vocab_size": shape["vocab_size"], "depths": list(depths), "layers": n_layers},
           "decoder_8b": decoder}
    res["verdicts"] = verdicts(res)
    out = args.out or ("runs/cpu_speed_smoke" if args.smoke else "results/cpu_speed")
    write_results(out, meta, {k: v for k, v in res.items() if k != "meta"}, table(res))
    print(table(res))


if __name__ == "__main__":
    main()
