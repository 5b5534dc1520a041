"""llama.cpp as a peer: its own quantization types applied to the same GGUF source, decoded and
scored through ``llama-cpp-python`` (ctypes over llama.cpp; an optional extra: it builds from source,
about 15 minutes on 2 cores).

Used by ``hf-rbe compare`` (perplexity rows) and ``bench/cpu_speed.py`` (speed rows). Token ids go
in as they are (no BOS added, no tokenizer on llama.cpp's side), so every row scores the same
tokens.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import subprocess
import sys
import weakref
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)

#: llama.cpp file types of the rows: a 4-bit k-quant, a 3-bit one and a 3-bit i-quant (IQ3_XXS,
#: closer to v2-3's width, needs an importance matrix in llama.cpp's quantizer; IQ3_S does not).
TYPES = {"Q4_K_M": 15, "Q3_K_M": 12, "IQ3_S": 26}
_OK = 0


def available() -> bool:
    """Whether ``llama-cpp-python`` and ``gguf`` import."""
    try:
        import gguf  # noqa: F401
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def version() -> str:
    import llama_cpp

    return llama_cpp.__version__


def _lib():  # noqa: ANN202
    """The ``llama_cpp`` module, its backend initialized and its log silenced (once)."""
    import llama_cpp

    if not getattr(_lib, "ready", False):
        llama_cpp.llama_backend_init()
        _lib.quiet = llama_cpp.llama_log_callback(lambda level, text, data: None)  # kept alive: C holds it
        llama_cpp.llama_log_set(_lib.quiet, ctypes.c_void_p(0))
        _lib.ready = True
    return llama_cpp


def quantize(src: Path, out: Path, type_name: str, threads: int) -> Path:
    """``src`` quantized by llama.cpp to ``type_name`` (a key of ``TYPES``; no importance matrix) at
    ``out``; a finished ``out`` is kept (the file is written under another name, then renamed)."""
    if out.exists():
        return out
    lib = _lib()
    params = lib.llama_model_quantize_default_params()
    params.nthread = threads
    params.ftype = TYPES[type_name]
    params.allow_requantize = True  # the packaged source is itself quantized (Q4_1)
    tmp = out.with_suffix(".part")
    rc = lib.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != _OK:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"llama_model_quantize {src.name} -> {type_name} failed ({rc})")
    tmp.rename(out)
    return out


def block_matrices(path: Path) -> tuple[int, int]:
    """(weights, bytes) of the decoder blocks' matrices in a GGUF file: the layers every compare
    row quantizes (the embedding and LM head are not counted, for llama.cpp as for the others)."""
    from gguf import GGUFReader

    mats = [t for t in GGUFReader(str(path)).tensors if t.name.startswith("blk.") and len(t.shape) == 2]
    return sum(int(t.n_elements) for t in mats), sum(int(t.n_bytes) for t in mats)


def linear_bits_per_weight(path: Path) -> float:
    weights, nbytes = block_matrices(path)
    return 8 * nbytes / weights


@functools.cache
def repack_works(path: Path, threads: int) -> bool:
    """Whether llama.cpp decodes ``path`` with its repacked CPU weight layouts, tried once per process
    in a child process: on some CPUs they kill the process (an illegal instruction, a segfault)."""
    code = (f"from hf_rbe.evaluation.llama_cpp import Session; "
            f"Session({str(path)!r}, {threads}, 64, True).generate([1, 2, 3], 2)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=600)
    if done.returncode != 0:
        logger.warning("llama.cpp with weight repacking failed on this CPU (exit %d): sessions without it",
                       done.returncode)
    return done.returncode == 0


class Session:
    """A GGUF model and one context on it (one sequence, ``threads`` threads). ``repack``: llama.cpp's
    repacked CPU weight layouts; ``None``: where :func:`repack_works` finds that they run."""

    def __init__(self, path: Path, threads: int, n_ctx: int, repack: bool | None = None) -> None:
        if repack is None:
            repack = repack_works(Path(path), threads)
        lib = self.lib = _lib()
        mp = lib.llama_model_default_params()
        mp.use_extra_bufts = repack
        self.model = lib.llama_model_load_from_file(str(path).encode(), mp)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        cp = lib.llama_context_default_params()
        cp.n_ctx = cp.n_batch = n_ctx
        cp.n_ubatch = min(n_ctx, 512)
        cp.n_threads = cp.n_threads_batch = threads
        self.ctx = lib.llama_init_from_model(self.model, cp)
        if not self.ctx:
            lib.llama_model_free(self.model)
            raise RuntimeError(f"llama.cpp could not make a context for {path}")
        self.n_ctx = n_ctx
        self.n_vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(self.model))

    def clear(self) -> None:
        """Forget every token fed so far."""
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)

    def decode(self, tokens: list[int]) -> int:
        """Feed ``tokens`` after the cache's; returns the greedy next token."""
        arr = (self.lib.llama_token * len(tokens))(*tokens)
        rc = self.lib.llama_decode(self.ctx, self.lib.llama_batch_get_one(arr, len(tokens)))
        if rc != _OK:
            raise RuntimeError(f"llama_decode returned {rc}")
        logits = np.ctypeslib.as_array(self.lib.llama_get_logits_ith(self.ctx, -1), shape=(self.n_vocab,))
        return int(logits.argmax())

    def generate(self, prompt: list[int], n: int) -> list[int]:
        """``n`` greedy tokens after ``prompt`` on an empty cache."""
        self.clear()
        out = [self.decode(prompt)]
        while len(out) < n:
            out.append(self.decode(out[-1:]))
        return out

    def logits(self, tokens: list[int]) -> np.ndarray:
        """fp32 [len(tokens), vocab]: the logits at every position of ``tokens`` fed on an empty cache."""
        if not 0 < len(tokens) <= self.n_ctx:
            raise ValueError(f"{len(tokens)} tokens; this context holds 1 to {self.n_ctx}")
        lib = self.lib
        self.clear()
        batch = lib.llama_batch_init(len(tokens), 0, 1)
        try:
            for i, t in enumerate(tokens):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = t, i, 1
                batch.seq_id[i][0], batch.logits[i] = 0, True
            batch.n_tokens = len(tokens)
            rc = lib.llama_decode(self.ctx, batch)
            if rc != _OK:
                raise RuntimeError(f"llama_decode returned {rc}")
            return np.ctypeslib.as_array(lib.llama_get_logits(self.ctx), shape=(len(tokens), self.n_vocab)).copy()
        finally:
            lib.llama_batch_free(batch)

    def close(self) -> None:
        self.lib.llama_free(self.ctx)
        self.lib.llama_model_free(self.model)


class LlamaCppLM(nn.Module):
    """A llama.cpp session behind a causal LM's forward (``input_ids``, ``attention_mask`` ->
    ``.logits``), so :func:`hf_rbe.evaluation.measure.perplexity` scores it as it scores every
    other row. Rows are fed one at a time, each on an empty cache; padded positions get zeros."""

    def __init__(self, path: Path, threads: int, n_ctx: int) -> None:
        super().__init__()
        self.session = session = Session(path, threads, n_ctx)
        self._close = weakref.finalize(self, session.close)  # llama.cpp's memory goes with the module
        self.anchor = nn.Parameter(torch.zeros(0), requires_grad=False)  # where the logits come back

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                **_: object) -> SimpleNamespace:
        rows, width = input_ids.shape
        lengths = attention_mask.sum(1).tolist() if attention_mask is not None else [width] * rows
        out = torch.zeros(rows, width, self.session.n_vocab)
        for r, n in enumerate(lengths):
            out[r, :n] = torch.from_numpy(self.session.logits(input_ids[r, :n].tolist()))
        return SimpleNamespace(logits=out)

    def close(self) -> None:
        self._close()
