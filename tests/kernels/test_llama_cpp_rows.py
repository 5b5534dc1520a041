"""bench/llama_cpp_rows.py: an 8B-shaped decoder written as GGUF, quantized and decoded by llama.cpp
(when it is installed), and the bench's timing candidates on it."""

import sys
from pathlib import Path

import pytest

from hf_rbe.evaluation import llama_cpp as lc

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
if not lc.available():
    pytest.skip("llama-cpp-python and gguf are not installed (bench-only extras)", allow_module_level=True)
import llama_cpp_rows as rows  # noqa: E402  (bench/, put on the path above)

SHAPE = dict(hidden_size=256, intermediate_size=512, num_attention_heads=8, num_key_value_heads=2,
             vocab_size=300, max_position_embeddings=256, rope_theta=10000.0)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    work = tmp_path_factory.mktemp("gguf")
    src = rows.write_decoder(work / "d-F16.gguf", SHAPE, 2)
    return src, lc.quantize(src, work / "d-Q4_K_M.gguf", "Q4_K_M", 2)


def test_bits_per_weight_counts_the_blocks_matrices(files):
    src, q = files
    assert lc.linear_bits_per_weight(src) == 16.0
    assert 4.0 < lc.linear_bits_per_weight(q) < 6.0  # Q4_K (4.5) with some tensors at Q6_K


def test_greedy_decoding_is_deterministic_and_uses_the_cache(files):
    _, q = files
    s = lc.Session(q, 2, 64, False)
    try:
        assert s.n_vocab == SHAPE["vocab_size"]
        a = s.generate([1, 2, 3, 4], 6)
        assert a == s.generate([1, 2, 3, 4], 6) and all(0 <= t < SHAPE["vocab_size"] for t in a)
        s.clear()  # the cache carries the context: feeding the prompt token by token gives the same tokens
        got = None
        for t in [1, 2, 3, 4]:
            got = s.decode([t])
        assert got == a[0]
        steps = rows.step_candidates({"q": s}, 4)
        for _ in range(3):
            steps["q"]()
    finally:
        s.close()
