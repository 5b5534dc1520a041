"""The evaluation harness: local evaluate metrics on known answers, data loaders, model cards,
and the size accounting of the comparison."""

import math

import numpy as np
import pytest
import torch

from hf_rbe import RBEConfig
from hf_rbe.metrics import load


# ----------------------------------------------------------------------------- metrics


def test_perplexity_metric_known_answer():
    m = load("perplexity")
    # a model uniform over 8 tokens has NLL log 8 per token: perplexity exactly 8
    m.add_batch(predictions=[3 * math.log(8)], references=[3])
    m.add_batch(predictions=[math.log(8)], references=[1])
    res = m.compute(context=4, stride=2)
    assert res["perplexity"] == pytest.approx(8.0, rel=1e-12)
    assert (res["tokens_scored"], res["context"], res["stride"]) == (4, 4, 2)
    with pytest.raises(ValueError, match="no tokens"):
        load("perplexity").compute(predictions=[0.0], references=[0])


def test_sliding_window_perplexity_of_a_uniform_model():
    from hf_rbe.eval import perplexity

    class Uniform(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, attention_mask=None):
            return type("Out", (), {"logits": torch.zeros(*input_ids.shape, 50)})()

    res = perplexity(Uniform(), torch.arange(100) % 50, context=16, stride=8, progress=False)
    assert res.perplexity == pytest.approx(50.0, rel=1e-6)  # log_softmax runs in float32
    assert res.tokens_scored == 99  # every token but the first, each scored once


def test_embedding_cosine_metric_known_answer():
    res = load("embedding_cosine").compute(predictions=[[1, 0], [1, 1], [0, 2]], references=[[1, 0], [1, 0], [0, 1]])
    assert res["cos_mean"] == pytest.approx((1 + 1 / math.sqrt(2) + 1) / 3)
    assert res["cos_min"] == pytest.approx(1 / math.sqrt(2))
    with pytest.raises(ValueError, match="zeros"):
        load("embedding_cosine").compute(predictions=[[0, 0]], references=[[1, 0]])


def test_probe_accuracy_separable_and_random():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 8))
    split = [i < 200 for i in range(400)]
    sep = load("probe_accuracy").compute(predictions=x.tolist(), references=(x[:, 2] > 0).astype(int).tolist(), is_train=split)
    assert sep["accuracy"] >= 0.97 and sep["test_examples"] == 200
    noise = load("probe_accuracy").compute(predictions=x.tolist(), references=rng.integers(0, 2, 400).tolist(), is_train=split)
    assert 0.35 < noise["accuracy"] < 0.65  # labels independent of the inputs: chance
    with pytest.raises(ValueError, match="is_train"):
        load("probe_accuracy").compute(predictions=x.tolist(), references=[0] * 400)


# ----------------------------------------------------------------------------- data


def test_wordnet_parser_on_a_fixture():
    from hf_rbe.data import parse_wordnet_nouns

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
    from hf_rbe.data import _reflow

    assert _reflow(["CHAPTER I", "", "It is a truth", "universally acknowledged.", "", "", "Next."]) == \
        "CHAPTER I\n\nIt is a truth universally acknowledged.\n\nNext."


def test_austen_and_wordnet_load_as_datasets():
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
    from hf_rbe import data

    monkeypatch.setenv("HF_RBE_CACHE", str(tmp_path))
    (tmp_path / "wordnet-data.noun").write_text("00001740 03 n 01 entity 0 000 | tampered\n")
    with pytest.raises(data.DataNotFound, match="checksum mismatch"):
        data.wordnet_nouns()
    assert not (tmp_path / "wordnet-data.noun").exists()


# ----------------------------------------------------------------------------- cards


def test_save_pretrained_writes_the_card_and_keeps_a_users_readme(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from hf_rbe.eval import model_size

    m = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=RBEConfig.from_preset("rbe-3"))
    m.save_pretrained(tmp_path / "a")
    card = (tmp_path / "a" / "README.md").read_text()
    assert f"base_model: {tiny_llama_dir}" in card and "import hf_rbe" in card and '"quant_method": "rbe"' in card
    assert f"**{model_size(m)['bits_per_weight']:.3f} bits per weight**" in card
    assert "Not measured yet" in card
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "README.md").write_text("my own notes")
    m.save_pretrained(tmp_path / "b")
    assert (tmp_path / "b" / "README.md").read_text() == "my own notes"


def test_push_to_hub_uploads_the_rbe_card(tiny_llama_dir, monkeypatch):
    from huggingface_hub import ModelCard, ModelCardData
    from transformers import AutoModelForCausalLM, PreTrainedModel
    from transformers.utils import hub

    uploaded = {}

    class FakeApi:
        def create_repo(self, repo_id, **kw):
            return type("Repo", (), {"repo_id": repo_id})()

    def fake_card(repo_id, tags=None, token=None):  # what transformers writes when the repo has no card
        return ModelCard.from_template(ModelCardData(library_name="transformers"),
                                       model_description="This model card has been automatically generated.")

    def fake_upload(self, working_dir, repo_id, *a, **kw):
        uploaded["readme"] = (working_dir and open(f"{working_dir}/README.md").read())
        uploaded["repo"] = repo_id

    monkeypatch.setattr(hub, "hf_api", lambda: FakeApi())
    monkeypatch.setattr(hub, "create_and_tag_model_card", fake_card)
    monkeypatch.setattr(PreTrainedModel, "_upload_modified_files", fake_upload)
    m = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=RBEConfig.from_preset("rbe-3"))
    m.push_to_hub("someone/tiny-rbe")
    assert uploaded["repo"] == "someone/tiny-rbe"
    assert "someone/tiny-rbe" in uploaded["readme"] and "import hf_rbe" in uploaded["readme"]


def test_card_command_adds_metrics(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from hf_rbe.cli import main

    AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=RBEConfig.from_preset("rbe-3")).save_pretrained(tmp_path)
    main(["card", str(tmp_path), "--base-model", "tiny-llama", "--metrics", '{"wikipedia ppl": 125.0}'])
    card = (tmp_path / "README.md").read_text()
    assert "| wikipedia ppl | 125.0 |" in card and "base_model: tiny-llama" in card
    with pytest.raises(SystemExit, match="not a quantized checkpoint"):
        main(["card", tiny_llama_dir, "--base-model", "x"])


# ----------------------------------------------------------------------------- comparison


def test_quantized_size_counts_every_method_alike(tiny_llama_dir):
    from hf_rbe.compare import methods
    from hf_rbe import RBELinear
    from hf_rbe.eval import quantized_size
    from transformers import AutoModelForCausalLM

    by_name = {m.name: m for m in methods()}
    n_linear = 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128)  # per layer: q, o; k, v (2 kv heads); gate, up, down
    # quanto groups by min(128, in_features): down_proj (in 128, 2/9 of the weights) at 4.25, the rest at 4.5
    quanto4 = (7 / 9) * (4 + 32 / 64) + (2 / 9) * (4 + 32 / 128)
    expect = {"HQQ 2-bit g64": 2 + 32 / 64, "HQQ 4-bit g64": 4 + 32 / 64, "quanto int4": quanto4,
              "bitsandbytes int8": (7 / 9) * (8 + 16 / 64) + (2 / 9) * (8 + 16 / 128),  # int8 + a scale per row
              "RBE rbe-2.5": None}
    for name, bpw in expect.items():
        model = by_name[name].load(tiny_llama_dir, AutoModelForCausalLM)
        n, bits = quantized_size(model)
        assert n == n_linear, name  # the same layers for every method; lm_head stays unquantized
        if bpw is None:  # RBE: what its own layers report (shared tables included)
            bpw = sum(m.storage_bits() for m in model.modules() if isinstance(m, RBELinear)) / n
            assert bpw > 2.5  # the shared 2^7-entry table is not free on 74k weights
        assert bits / n == pytest.approx(bpw, abs=0.05), name


def _rows() -> list[dict]:
    from hf_rbe.compare import MINILM, SMOLLM2

    lm = dict(model=SMOLLM2, tokens=8192, tokens_scored=8184, context=1024, stride=1024, load_seconds=1.0,
              peak_load_mib=10.0, bytes_on_disk=None, quantized_weights=100)
    enc = dict(model=MINILM, cos_min=0.1, load_seconds=1.0, peak_load_mib=1.0, bytes_on_disk=1, quantized_weights=10)
    return [
        {**lm, "method": "fp32 (unquantized)", "family": "fp32", "bits_per_weight": 32.0, "wikipedia_ppl": 20.0, "austen_ppl": 30.0},
        {**lm, "method": "RBE rbe-2", "family": "RBE", "bits_per_weight": 2.02, "wikipedia_ppl": 900.0, "austen_ppl": 800.0},
        {**lm, "method": "RBE rbe-3", "family": "RBE", "bits_per_weight": 3.02, "wikipedia_ppl": 22.0, "austen_ppl": 33.0},
        {**lm, "method": "HQQ 2-bit g64", "family": "HQQ", "bits_per_weight": 2.5, "wikipedia_ppl": 500.0, "austen_ppl": 400.0},
        {**lm, "method": "HQQ 3-bit g64", "family": "HQQ", "bits_per_weight": 3.7, "wikipedia_ppl": 25.0, "austen_ppl": 35.0},
        {"model": SMOLLM2, "method": "bitsandbytes NF4", "family": "bitsandbytes", "error": "RuntimeError: no GPU"},
        {**enc, "method": "RBE rbe-2", "family": "RBE", "bits_per_weight": 2.04, "cos_mean": 0.6, "accuracy": 0.74},
        {**enc, "method": "seed64 + scale", "family": "seed64", "bits_per_weight": 0.1, "cos_mean": 0.99, "accuracy": 0.9},
        {**enc, "method": "quanto int2", "family": "quanto", "bits_per_weight": 2.25, "cos_mean": 0.1, "accuracy": 0.65},
    ]


def test_compare_targets_on_known_rows():
    from hf_rbe.compare import targets

    got = "\n".join(targets(_rows()))
    # SmolLM2 <= 2.5 bits: the best baseline (HQQ 2-bit, 500) beats RBE rbe-2 (900): missed
    assert "SmolLM2 Wikipedia perplexity: best RBE RBE rbe-2 900 vs best baseline HQQ 2-bit g64 500: **missed**" in got
    # seed64 is ours, not a baseline: MiniLM compares rbe-2 with quanto int2 only
    assert "MiniLM embedding cosine: best RBE RBE rbe-2 0.6 vs best baseline quanto int2 0.1: **met**" in got
    assert "within 15% of fp32: 22 vs 20 (+10%): **met**" in got
    assert "ahead of HQQ 3-bit g64 (3.70 bpw): 22 vs 25: **met**" in got


def test_compare_render_writes_table_and_plot(tmp_path):
    import json

    from hf_rbe.cli import main

    out = tmp_path / "cmp"
    meta = {"machine": "test box", "date": "2026-11-23", "command": "hf-rbe compare", "wall_seconds": 120}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": _rows()}))
    main(["compare", "--render-only", "--out", str(out)])
    md = out.with_suffix(".md").read_text()
    assert "`hf-rbe compare` on test box, 2026-11-23 (2 minutes)" in md
    assert "| RBE rbe-3 | 3.020 | 22.00 | 33.00 |" in md
    assert "| bitsandbytes NF4 | did not run here: RuntimeError: no GPU |" in md
    assert "context 1024, stride 1024" in md
    png = out.with_suffix(".png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
