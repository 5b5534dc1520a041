"""WordNet 3.0 nouns and their hypernyms (Debian ``wordnet-base``), and a hypernymy task built on them."""

from __future__ import annotations

import random
from typing import Any

from .cache import checked_file

NAME = "wordnet"
RAW_FILE = "wordnet-data.noun"
SHA256 = "fea17d2f9656611334eac790e5d69e47645fa180c4aa481fb4cd9b3520754ca2"


def wordnet_nouns() -> dict[str, dict[str, object]]:
    """WordNet 3.0 noun synsets from ``wordnet-base``'s ``data.noun``:
    ``{offset: {"words": [lemma, ...], "hypernyms": [offset, ...]}}`` (``@`` and ``@i`` pointers)."""
    path = checked_file(RAW_FILE, SHA256, NAME)
    return parse_wordnet_nouns(path.read_text(encoding="latin-1").splitlines())


def parse_wordnet_nouns(lines: list[str]) -> dict[str, dict[str, object]]:
    """Parse lines of a WordNet ``data.noun`` file (format in wndb(5WN)): offset, lexicographer
    file, type, word count (hex), words with lex ids, pointer count, pointers, ``| gloss``."""
    synsets: dict[str, dict[str, object]] = {}
    for line in lines:
        if not line.strip() or line.startswith("  "):  # licence header
            continue
        fields = line.split(" | ")[0].split()
        offset, n_words = fields[0], int(fields[3], 16)
        words = [w.replace("_", " ") for w in fields[4 : 4 + 2 * n_words : 2]]
        rest = fields[4 + 2 * n_words :]
        n_ptr = int(rest[0])
        hypernyms = [rest[1 + 4 * i + 1] for i in range(n_ptr) if rest[1 + 4 * i] in ("@", "@i")]
        synsets[offset] = {"words": words, "hypernyms": hypernyms}
    return synsets


def hypernym_pairs(n_train: int = 2000, n_test: int = 1000, min_depth: int = 4, seed: int = 0) -> Any:
    """A balanced noun-pair task from WordNet: is one noun a hypernym (ancestor, transitively)
    of the other? Columns ``word_a``, ``word_b``, ``label``.

    Nouns are the first lemma of a synset when it is one lowercase alphabetic word of >= 3
    letters. Positives pair a noun with one of its ancestors at depth >= ``min_depth`` (so not
    "entity" or "object"), in random order; negatives pair two nouns neither of which is an
    ancestor of the other. Train and test use disjoint sets of first nouns (split by synset).
    """

    from datasets import Dataset, DatasetDict

    nouns = wordnet_nouns()
    depth: dict[str, int] = {}
    ancestors: dict[str, frozenset[str]] = {}

    def walk(s: str) -> None:  # iterative post-order: WordNet paths are ~20 deep, no recursion limit issue
        stack = [s]
        while stack:
            cur = stack[-1]
            todo = [h for h in nouns[cur]["hypernyms"] if h not in depth and h in nouns]  # type: ignore[union-attr]
            if todo:
                stack.extend(todo)
                continue
            stack.pop()
            hyp = [h for h in nouns[cur]["hypernyms"] if h in nouns]  # type: ignore[union-attr]
            depth[cur] = 1 + min((depth[h] for h in hyp), default=-1)
            ancestors[cur] = frozenset(hyp).union(*(ancestors[h] for h in hyp))

    def lemma(s: str) -> str | None:
        w = nouns[s]["words"][0]  # type: ignore[index]
        return w if w.isalpha() and w.islower() and len(w) >= 3 else None

    for s in nouns:
        if s not in depth:
            walk(s)
    usable = sorted(s for s in nouns if lemma(s))
    rng = random.Random(seed)
    rng.shuffle(usable)
    cut = len(usable) * 2 // 3
    pools = {"train": (usable[:cut], n_train), "test": (usable[cut:], n_test)}
    out = {}
    for split, (pool, n) in pools.items():
        rows: list[dict[str, object]] = []
        while len(rows) < n:
            a = rng.choice(pool)
            if len(rows) % 2 == 0:
                ups = sorted(h for h in ancestors[a] if depth[h] >= min_depth and lemma(h) and lemma(h) != lemma(a))
                if not ups:
                    continue
                pair, label = [lemma(a), lemma(rng.choice(ups))], 1
            else:
                b = rng.choice(usable)
                if b == a or b in ancestors[a] or a in ancestors[b] or lemma(a) == lemma(b):
                    continue
                pair, label = [lemma(a), lemma(b)], 0
            rng.shuffle(pair)
            rows.append({"word_a": pair[0], "word_b": pair[1], "label": label})
        out[split] = Dataset.from_list(rows)
    return DatasetDict(out)
