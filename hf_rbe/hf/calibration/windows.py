"""Calibration text into token windows: what every later step runs the model on.

``dataset`` (strings, a ``datasets.Dataset`` with a ``text`` column, or a corpus name) is joined,
tokenized once and cut into ``calibration_samples`` windows of ``calibration_seqlen`` tokens
(deterministic for a seed), each framed by the tokenizer's special tokens. A named offline corpus
skips its first ``TRAIN_START`` tokens: that is the held-out text the perplexity recipes score,
so calibration never sees it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import nn

from ...core.errors import ConfigError
from ...data import CORPORA, TRAIN_START, joined_ids, special_frame, text_dataset
from ..config import RBEConfig

T = TypeVar("T")


def _texts(dataset: Any) -> list[str]:
    if isinstance(dataset, list):
        texts = dataset
    elif isinstance(dataset, str):
        texts = list(text_dataset(dataset, hub_split="train")["text"])
    else:
        texts = list(dataset["text"])
    bad = next(((i, t) for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise ConfigError(f"calibration text {bad[0]} is {type(bad[1]).__name__}, not a string: drop or convert "
                          "such rows (e.g. dataset.filter(lambda r: isinstance(r['text'], str)))")
    return texts


def _tokenized(step: Callable[..., T], tokenizer: Any, *args: Any) -> T:
    """``step(tokenizer, *args)``, with a message for a tokenizer that is not called the way
    transformers' are (``tok(text, add_special_tokens=..., return_tensors="pt").input_ids``)."""
    try:
        return step(tokenizer, *args)
    except (TypeError, AttributeError, ValueError) as err:
        raise ConfigError(f"the tokenizer ({type(tokenizer).__name__}) cannot be called as a transformers tokenizer "
                          f"is, tok(text, add_special_tokens=False, return_tensors='pt').input_ids: {err}") from err


def calibration_ids(config: RBEConfig, tokenizer: Any, vocab_size: int | None) -> torch.Tensor:
    """int64 [samples, seqlen]: windows of the calibration text, the same for the same config,
    each framed by the special tokens the tokenizer puts around one input (an encoder's
    ``[CLS]`` is an attention sink whose activations are far larger than any word's: a layer
    calibrated without it is encoded for inputs it never sees)."""
    dataset, seqlen = config.dataset, config.calibration_seqlen
    named = isinstance(dataset, str) and dataset in CORPORA
    texts = _texts(dataset)
    if not any(t.strip() for t in texts):
        raise ConfigError("the calibration dataset holds no text")
    head, tail = _tokenized(special_frame, tokenizer)
    body = seqlen - len(head) - len(tail)
    if body < 1:
        raise ConfigError(f"calibration_seqlen={seqlen} leaves no room for text between the tokenizer's "
                          f"{len(head) + len(tail)} special tokens")
    ids = _tokenized(joined_ids, tokenizer, texts)
    if named:  # the held-out start of an offline corpus is what the perplexity recipes score
        ids = ids[TRAIN_START:]
    if ids.numel() < body:
        where = " after the held-out part" if named else ""
        raise ConfigError(f"the calibration text has {ids.numel()} tokens{where}, fewer than "
                          f"calibration_seqlen={seqlen} needs: give more text or a shorter one")
    g = torch.Generator().manual_seed(config.calibration_seed)
    starts = torch.randint(0, ids.numel() - body + 1, (config.calibration_samples,), generator=g)
    windows = torch.stack([torch.cat([torch.tensor(head, dtype=ids.dtype), ids[s : s + body],
                                      torch.tensor(tail, dtype=ids.dtype)]) for s in starts.tolist()])
    top = max([int(ids.max()), *head, *tail])
    if vocab_size is not None and top >= vocab_size:
        raise ConfigError(f"the tokenizer produced id {top}, but the model's vocabulary has {vocab_size} "
                          "entries: is it the model's tokenizer?")
    return windows


def resolve_tokenizer(model: nn.Module, config: RBEConfig, given: Any) -> Any:
    """The tokenizer to cut windows with: ``given``, else ``config.tokenizer`` (an object or a name),
    else the model's own (``config._name_or_path``)."""
    tok = given if given is not None else config.tokenizer
    if tok is None or isinstance(tok, str):
        from transformers import AutoTokenizer

        source = tok or getattr(getattr(model, "config", None), "_name_or_path", None)
        try:
            tok = AutoTokenizer.from_pretrained(source)
        except Exception as err:
            raise ConfigError(f"calibration needs the model's tokenizer: pass tokenizer=... (could not load one "
                              f"from {source!r}: {type(err).__name__})") from err
    if not callable(tok):
        raise ConfigError(f"tokenizer must be a tokenizer or its name, got {type(tok).__name__}")
    return tok
