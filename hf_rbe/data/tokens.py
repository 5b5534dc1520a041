"""Texts into one token stream, the way tokenizing them joined by blank lines would, in bounded memory.

A tokenizer's working memory grows with the string it is given, many times its size (hundreds of
MiB for the offline Wikipedia corpus, kept by the allocator afterwards), so the texts are tokenized
one at a time, each after the first with its blank line in front: splitting where the join put a
blank line gives the tokens the joined text would (``tests/data/test_tokens.py`` checks it on the
offline corpora). A text longer than ``PIECE_CHARS`` is cut the same way, at the whitespace before
its last blank line within the limit (else before its last whitespace), so one huge string costs
no more than one piece does.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

#: Characters tokenized at once (a longer text is cut: module docstring).
PIECE_CHARS = 1 << 20


def special_frame(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The special tokens ``tokenizer`` puts before and after one input (BERT: ``[CLS]`` and
    ``[SEP]``; most language models: nothing, or a BOS)."""
    def ids(special: bool) -> list[int]:
        out = tokenizer("a", add_special_tokens=special).input_ids
        return [int(i) for i in torch.as_tensor(out).flatten()]

    bare, full = ids(False), ids(True)
    for i in range(len(full) - len(bare) + 1):
        if full[i : i + len(bare)] == bare:
            return full[:i], full[i + len(bare) :]
    return [], []


def _pieces(text: str) -> Iterator[str]:
    """``text`` in pieces of at most ``PIECE_CHARS`` characters, each cut where a whitespace run begins
    (one holding a blank line where there is one): pre-tokenizers split there, so the pieces' tokens
    are the text's. Only a piece with no whitespace at all is cut mid-word."""
    while len(text) > PIECE_CHARS:
        at = text.rfind("\n\n", 1, PIECE_CHARS)
        if at < 1:
            at = max(text.rfind(c, 1, PIECE_CHARS) for c in " \n\t\r")
        if at < 1:
            at = PIECE_CHARS
        while at > 1 and text[at - 1].isspace():
            at -= 1
        yield text[:at]
        text = text[at:]
    yield text


def joined_ids(tokenizer: Any, texts: list[str]) -> torch.Tensor:
    """int64 [T]: the ids of ``texts`` joined by blank lines, without special tokens."""
    parts = [torch.as_tensor(tokenizer(piece, add_special_tokens=False, return_tensors="pt").input_ids).reshape(-1)
             for i, t in enumerate(texts) for piece in _pieces(("\n\n" if i else "") + t)]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)
