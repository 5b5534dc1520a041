"""Texts into one token stream, the way tokenizing them joined by blank lines would, in bounded memory.

A tokenizer's working memory grows with the string it is given, many times its size (hundreds of
MiB for the offline Wikipedia corpus, kept by the allocator afterwards), so the texts are tokenized
one at a time, each after the first with its blank line in front: splitting where the join put a
blank line gives the tokens the joined text would (``tests/data/test_tokens.py`` checks it on the
offline corpora).
"""

from __future__ import annotations

from typing import Any

import torch


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


def joined_ids(tokenizer: Any, texts: list[str]) -> torch.Tensor:
    """int64 [T]: the ids of ``texts`` joined by blank lines, without special tokens."""
    parts = [torch.as_tensor(tokenizer(("\n\n" if i else "") + t, add_special_tokens=False,
                                       return_tensors="pt").input_ids).reshape(-1) for i, t in enumerate(texts)]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)
