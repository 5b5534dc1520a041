"""The offline corpora: parsers on fixtures, the real files, checksums, and loaders that never download."""

import pytest

from hf_rbe.data import strip_wiki_markup


def test_wordnet_parser_on_a_fixture():
    from hf_rbe.data.wordnet import parse_wordnet_nouns

    lines = [
        "  1 This software and database is being provided to you, the LICENSEE, by",
        "00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 ~ 00002137 n 0000 ~ 04424418 n 0000 | that which is perceived",
        "00002137 03 n 02 abstraction 0 abstract_entity 0 002 @ 00001740 n 0000 + 00692347 v 0101 | a general concept",
        "09000001 18 n 01 Jane_Austen 0 001 @i 10000002 n 0000 | English novelist",
    ]
    got = parse_wordnet_nouns(lines)
    assert got == {"00001740": {"words": ["entity"], "hypernyms": []},
                   "00002137": {"words": ["abstraction", "abstract entity"], "hypernyms": ["00001740"]},
                   "09000001": {"words": ["Jane Austen"], "hypernyms": ["10000002"]}}


def test_reflow_joins_hard_wrapped_lines():
    from hf_rbe.data.austen import _reflow

    assert _reflow(["CHAPTER I", "", "It is a truth", "universally acknowledged.", "", "", "Next."]) == \
        "CHAPTER I\n\nIt is a truth universally acknowledged.\n\nNext."


def test_austen_and_wordnet_load_as_datasets(corpora):
    from hf_rbe.data import text_dataset, wordnet_nouns

    ds = text_dataset("austen")
    assert ds.num_rows == 6 and set(ds.column_names) == {"title", "text"}
    pride = ds[ds["title"].index("prideprejudice")]["text"]
    assert "It is a truth universally acknowledged, that a single man in possession of a good fortune" in pride
    nouns = wordnet_nouns()
    assert len(nouns) == 82115 and nouns["02084071"]["words"][0] == "dog"
    assert "02083346" in nouns["02084071"]["hypernyms"]  # dog -> canine
    from hf_rbe.data import DataNotFound

    with pytest.raises(DataNotFound, match="not one of the offline corpora"):  # tests run with HF_HUB_OFFLINE=1
        text_dataset("wikitext", "wikitext-2-raw-v1")


def test_tampered_cache_file_is_removed_with_a_clear_error(tmp_path, monkeypatch):
    from hf_rbe.data import DataNotFound, wordnet_nouns

    monkeypatch.setenv("HF_RBE_CACHE", str(tmp_path))
    (tmp_path / "wordnet-data.noun").write_text("00001740 03 n 01 entity 0 000 | tampered\n")
    with pytest.raises(DataNotFound, match="checksum mismatch"):
        wordnet_nouns()
    assert not (tmp_path / "wordnet-data.noun").exists()
    with pytest.raises(DataNotFound, match="run `hf-rbe data fetch wordnet`"):
        wordnet_nouns()


def test_loaders_never_download(tmp_path, monkeypatch):
    """The library's loaders only read the cache; fetching is the tool's job."""
    import subprocess

    from hf_rbe import data

    def no_subprocess(*a, **k):
        raise AssertionError("a loader started a subprocess")

    monkeypatch.setenv("HF_RBE_CACHE", str(tmp_path))
    monkeypatch.setattr(subprocess, "run", no_subprocess)
    for loader in (data.wikipedia_articles, data.movie_reviews, data.austen_novels, data.wordnet_nouns,
                   data.smollm2_path):
        with pytest.raises(data.DataNotFound, match="hf-rbe data fetch"):
            loader()


def test_movie_reviews_and_wikipedia_load(corpora):
    from hf_rbe.data import movie_reviews, wikipedia_articles

    reviews = movie_reviews()
    assert len(reviews) == 10568 and {r["label"] for r in reviews} == {0, 1}
    assert all(isinstance(r["text"], str) and r["text"] for r in reviews[:100])
    articles = wikipedia_articles()
    assert len(articles) == 106
    assert all("[[" not in a["text"] and "{{" not in a["text"] for a in articles)


def test_strip_wiki_markup_on_a_known_snippet():
    raw = ("{{Infobox|name=x}}'''Anarchism''' is a [[political philosophy|philosophy]]<ref>cite</ref> "
           "that [[State (polity)|rejects]] [[Category:Foo]]\n== History ==\nText [http://a.b link].")
    assert strip_wiki_markup(raw) == "Anarchism is a philosophy that rejects \nHistory\nText link."
