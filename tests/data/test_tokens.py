"""Texts tokenized one at a time give the tokens of the texts joined by blank lines, on the offline
corpora with the tokenizers the recipes use (what lets calibration and the perplexity recipes
tokenize in bounded memory)."""

import pytest
import torch
from transformers import AutoTokenizer

from hf_rbe.data import joined_ids, special_frame, text_dataset, token_stream


@pytest.fixture(scope="module")
def smollm2_tokenizer(corpora):  # type: ignore[no-untyped-def]
    from hf_rbe.data.fetch import ensure

    return AutoTokenizer.from_pretrained(ensure("smollm2")["smollm2"])


@pytest.mark.slow
@pytest.mark.parametrize("corpus", ["wikipedia", "austen"])
def test_joined_ids_are_the_joined_texts_tokens(smollm2_tokenizer, corpus):
    texts = list(text_dataset(corpus)["text"])
    whole = smollm2_tokenizer("\n\n".join(texts), add_special_tokens=False, return_tensors="pt").input_ids[0]
    assert torch.equal(joined_ids(smollm2_tokenizer, texts), whole)


@pytest.mark.slow
def test_joined_ids_with_a_wordpiece_tokenizer(minilm_path):
    tok = AutoTokenizer.from_pretrained(minilm_path)
    texts = [r["text"] for r in text_dataset("movie_reviews")][:500]
    whole = tok("\n\n".join(texts), add_special_tokens=False, return_tensors="pt").input_ids[0]
    assert torch.equal(joined_ids(tok, texts), whole)
    assert special_frame(tok) == ([tok.cls_token_id], [tok.sep_token_id])


def test_token_stream_frames_the_stream_like_one_input(minilm_path, corpora):
    tok = AutoTokenizer.from_pretrained(minilm_path)
    ids = token_stream(tok, "movie_reviews")
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    assert ids.dtype == torch.int64 and ids.dim() == 1


@pytest.mark.slow
@pytest.mark.parametrize("blank_lines", [True, False])
def test_a_text_longer_than_a_piece_gives_the_whole_texts_tokens(smollm2_tokenizer, monkeypatch, blank_lines):
    """One long string (a novel; without its blank lines: cut at spaces) is tokenized in pieces
    that together give its tokens; with pieces this small, each novel is cut hundreds of times."""
    from hf_rbe.data import tokens

    texts = list(text_dataset("austen")["text"])[:2]
    if not blank_lines:
        texts = [" ".join(t.split()) for t in texts]
    whole = smollm2_tokenizer("\n\n".join(texts), add_special_tokens=False, return_tensors="pt").input_ids[0]
    calls = []
    real = smollm2_tokenizer.__class__.__call__
    monkeypatch.setattr(tokens, "PIECE_CHARS", 4096)
    monkeypatch.setattr(smollm2_tokenizer.__class__, "__call__",
                        lambda self, text, **kw: calls.append(len(text)) or real(self, text, **kw))
    assert torch.equal(joined_ids(smollm2_tokenizer, texts), whole)
    assert len(calls) > 200 and max(calls) <= 4096


def test_a_text_without_whitespace_is_still_cut(monkeypatch):
    from hf_rbe.data import tokens

    monkeypatch.setattr(tokens, "PIECE_CHARS", 10)
    assert list(tokens._pieces("x" * 25)) == ["x" * 10, "x" * 10, "x" * 5]
    assert list(tokens._pieces("aaaa bbbb\n\ncccc dd")) == ["aaaa bbbb", "\n\ncccc dd"]  # at the blank line
    assert list(tokens._pieces("aaaa bb \n\ncc")) == ["aaaa bb", " \n\ncc"]  # where its whitespace run begins
    assert list(tokens._pieces("aaaa bbbb cccc")) == ["aaaa bbbb", " cccc"]  # no blank line: at a space
