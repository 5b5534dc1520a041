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
    with pytest.raises(ValueError, match="unknown corpus"):
        text_dataset("wikitext-2")


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
