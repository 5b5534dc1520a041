"""Wikipedia: 106 articles from a test file of the ``gensim`` wheel, wiki markup stripped."""

from __future__ import annotations

import bz2
import re
from xml.etree import ElementTree

from .cache import checked_file

NAME = "wikipedia"
RAW_FILE = "enwiki-shortened.xml.bz2"
SHA256 = "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d"

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
    """The 106 Wikipedia articles as ``{"title", "text"}`` (markup stripped)."""
    raw = checked_file(RAW_FILE, SHA256, NAME)
    root = ElementTree.fromstring(bz2.decompress(raw.read_bytes()))
    ns = root.tag.split("}")[0] + "}" if root.tag.startswith("{") else ""
    articles = []
    for page in root.iter(f"{ns}page"):
        text = page.find(f"{ns}revision/{ns}text")
        body = strip_wiki_markup(text.text or "") if text is not None else ""
        if len(body) > 200 and not body.lower().startswith("#redirect"):
            articles.append({"title": page.findtext(f"{ns}title") or "", "text": body})
    return articles
