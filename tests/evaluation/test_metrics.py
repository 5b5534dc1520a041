"""The local evaluate metrics and the sliding-window perplexity, on known answers."""

import math

import numpy as np
import pytest
import torch

from hf_rbe.evaluation.metrics import load


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
    from hf_rbe.evaluation.measure import perplexity

    class Uniform(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.p = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids, attention_mask=None, use_cache=True):
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


def test_decode_speed_generates_exactly_the_tokens_it_times(monkeypatch):
    from conftest import tiny_llama_config
    from transformers import LlamaForCausalLM

    from hf_rbe.evaluation.measure import decode_speed

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config()).eval()
    lengths = []
    real = model.generate
    monkeypatch.setattr(model, "generate", lambda *a, **k: lengths.append(k["max_new_tokens"]) or real(*a, **k))
    res = decode_speed(model, prompt_tokens=4, new_tokens=5, repeats=3)
    assert res.tokens_per_second > 0 and (res.new_tokens, res.repeats) == (5, 3)
    assert sorted(lengths) == [1] * 4 + [5] * 4  # one warm-up and three timed runs of each length
    with pytest.raises(ValueError, match="new_tokens"):
        decode_speed(model, new_tokens=1)
