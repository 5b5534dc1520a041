"""The everyday Transformers flows, on every model family, compute dtype and codec (issue #17).

A contract suite in the spirit of torchao's reusable test cases: each flow is one test,
parametrised over ``FAMILIES x DTYPES x CODECS`` (tiny random models, a character tokenizer),
and each asserts a property, never just "no exception". ``bench/conformance.py`` runs this file
and renders the README's compatibility table from its results. Expensive steps are shared:
every case's model is built once (``_case``), and every saved checkpoint is reloaded by one
fresh Python process (``fresh_reloads``).
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import char_tokenizer, rel_mse
from safetensors.torch import save_file
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BertConfig,
    GPT2Config,
    LlamaConfig,
    TextStreamer,
    pipeline,
)

from hf_rbe import RBEConfig, quantize_model
from hf_rbe.core.packed import PackedLinear, packed_layers

FAMILIES = ("llama", "gpt2", "bert")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CODECS = ("v1", "v2", "seed64", "v2-calibrated")
#: Largest logit (or hidden-state) relative MSE to the unquantized model in the same dtype that
#: each codec is allowed on these random tiny models. v1 rbe-3 and v2-3 pass under 0.1 in every
#: family and dtype; the calibrated v2-3 reached 0.115 on Llama fp32 (its 4 calibration windows
#: are one repeated sentence, and the scored text is another), seed64 carries an rbe-2.5 residual.
TOLERANCE = {"v1": 0.1, "v2": 0.1, "seed64": 0.2, "v2-calibrated": 0.2}
TEXT = ["the quick brown fox jumps over the lazy dog and runs far away " * 6,
        "a small model reads a few words of plain text many times over " * 6]
PROMPT = "the fox"

CASES = [pytest.param(f, d, c, id=f"{f}-{d}-{c}") for f in FAMILIES for d in DTYPES for c in CODECS]
CAUSAL = [p for p in CASES if p.values[0] != "bert"]


def _config(codec: str, **kw: object) -> RBEConfig:
    if codec == "v1":
        return RBEConfig.from_preset("rbe-3", **kw)
    if codec == "v2":
        return RBEConfig.from_preset("v2-3", **kw)
    if codec == "seed64":
        return RBEConfig(codec="seed64", tile=32, residual="rbe", residual_stage={"dim": 4, "idx": 7, "amp": 2}, **kw)
    return RBEConfig.from_preset("v2-3", dataset=TEXT, tokenizer=char_tokenizer(), calibration_samples=4,
                                 calibration_seqlen=32, calibration_batch_size=2, calibration_finetune_steps=2, **kw)


def _auto(family: str):  # type: ignore[no-untyped-def]
    return AutoModelForSequenceClassification if family == "bert" else AutoModelForCausalLM


@functools.cache
def _source(family: str) -> Path:
    """A tiny random model of the family, saved once (fp32) with the character tokenizer."""
    import tempfile

    torch.manual_seed(0)
    out = Path(tempfile.mkdtemp(prefix=f"conformance-{family}-"))
    common = dict(vocab_size=128)
    if family == "llama":
        cfg = LlamaConfig(**common, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True,
                          pad_token_id=3, bos_token_id=1, eos_token_id=2)
    elif family == "gpt2":
        cfg = GPT2Config(**common, n_embd=64, n_layer=2, n_head=4, n_positions=128, pad_token_id=3, bos_token_id=1,
                         eos_token_id=2)
    else:
        cfg = BertConfig(**common, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                         max_position_embeddings=128, num_labels=2, pad_token_id=3)
    _auto(family).from_config(cfg).save_pretrained(out)
    char_tokenizer().save_pretrained(out)
    return out


def _inputs(family: str) -> dict[str, torch.Tensor]:
    return dict(char_tokenizer()(["the lazy fox", "a dog"], padding=True, return_tensors="pt"))


@torch.no_grad()
def _outputs(model: torch.nn.Module, family: str) -> torch.Tensor:
    """What the model computes on fixed text: logits (causal LM) or the encoder's last hidden state."""
    if family == "bert":
        return model(**_inputs(family), output_hidden_states=True).hidden_states[-1]
    return model(**_inputs(family)).logits


@functools.cache
def _reference(family: str, dtype: str) -> torch.Tensor:
    model = _auto(family).from_pretrained(_source(family), dtype=DTYPES[dtype]).eval()
    return _outputs(model, family)


@functools.cache
def _case(family: str, dtype: str, codec: str) -> torch.nn.Module:
    """The case's model, quantized on load (built once; tests that change a model copy it)."""
    return _auto(family).from_pretrained(_source(family), dtype=DTYPES[dtype], quantization_config=_config(codec)).eval()


def _copy(family: str, dtype: str, codec: str) -> torch.nn.Module:
    import copy

    return copy.deepcopy(_case(family, dtype, codec))


@pytest.mark.parametrize("family,dtype,codec", CASES)
def test_quantize_on_load(family, dtype, codec):
    model = _case(family, dtype, codec)
    layers = list(packed_layers(model))
    assert len(layers) >= 8, "every block Linear should be packed"
    out = _outputs(model, family)
    assert out.dtype == DTYPES[dtype] and torch.isfinite(out).all()
    err = rel_mse(out, _reference(family, dtype))
    assert err < TOLERANCE[codec], err
    if family == "bert":
        assert type(model.classifier) is torch.nn.Linear  # the task head stays in full precision


@pytest.mark.parametrize("family,dtype,codec", CASES)
def test_quantize_model_in_memory_equals_quantize_on_load(family, dtype, codec):
    model = _auto(family).from_pretrained(_source(family), dtype=DTYPES[dtype]).eval()
    quantize_model(model, _config(codec))
    assert torch.equal(_outputs(model, family), _outputs(_case(family, dtype, codec), family))


@pytest.fixture(scope="module")
def fresh_reloads(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Save every case (one file, and sharded), then reload them all in one fresh process with a
    plain ``from_pretrained``; returns ``{case/layout: (verdict, number of weight files)}``."""
    root = tmp_path_factory.mktemp("reloads")
    jobs, files = [], {}
    for p in CASES:
        family, dtype, codec = p.values
        model = _case(family, dtype, codec)
        for layout, kw in (("single", {}), ("sharded", {"max_shard_size": "20KB"})):
            d = root / f"{p.id}-{layout}"
            model.save_pretrained(d, **kw)
            save_file({"expected": _outputs(model, family).contiguous(), **_inputs(family)}, d / "expected.safetensors")
            jobs.append({"key": f"{p.id}/{layout}", "dir": str(d), "family": family})
            files[f"{p.id}/{layout}"] = len(list(d.glob("model*.safetensors")))
    script = """
import json, sys, torch, hf_rbe
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
out = {}
for job in json.load(open(sys.argv[1])):
    try:
        auto = AutoModelForSequenceClassification if job["family"] == "bert" else AutoModelForCausalLM
        m = auto.from_pretrained(job["dir"]).eval()
        t = load_file(job["dir"] + "/expected.safetensors")
        with torch.no_grad():
            kw = dict(input_ids=t["input_ids"], attention_mask=t["attention_mask"])
            got = m(**kw, output_hidden_states=True).hidden_states[-1] if job["family"] == "bert" else m(**kw).logits
        out[job["key"]] = "bit-identical" if torch.equal(got, t["expected"]) else f"differs by {(got - t['expected']).abs().max()}"
    except Exception as e:
        out[job["key"]] = f"{type(e).__name__}: {e}"
print(json.dumps(out))
"""
    (root / "jobs.json").write_text(json.dumps(jobs))
    res = subprocess.run([sys.executable, "-c", script, str(root / "jobs.json")], capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    verdicts = json.loads(res.stdout.strip().splitlines()[-1])
    return {k: (v, files[k]) for k, v in verdicts.items()}


@pytest.mark.parametrize("layout", ["single", "sharded"])
@pytest.mark.parametrize("family,dtype,codec", CASES)
def test_save_and_fresh_reload_bit_identical(fresh_reloads, family, dtype, codec, layout):
    verdict, files = fresh_reloads[f"{family}-{dtype}-{codec}/{layout}"]
    assert verdict == "bit-identical", verdict
    assert (files > 1) == (layout == "sharded"), files


@pytest.mark.parametrize("family,dtype,codec", CASES)
def test_dequantize_before_and_after_save(tmp_path, family, dtype, codec):
    model = _copy(family, dtype, codec)
    before = _outputs(model, family)
    model.save_pretrained(tmp_path / "q")
    model.dequantize()
    assert not list(packed_layers(model)) and not getattr(model, "is_quantized", False)
    assert rel_mse(_outputs(model, family), before) < 1e-4  # the same weights, now multiplied densely
    reloaded = _auto(family).from_pretrained(tmp_path / "q").eval()
    reloaded.dequantize()  # after save: the config holds its dtype as a string
    assert torch.equal(_outputs(reloaded, family), _outputs(model, family))
    reloaded.save_pretrained(tmp_path / "plain")
    cfg = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert "quantization_config" not in cfg  # a plain checkpoint again
    plain = _auto(family).from_pretrained(tmp_path / "plain", dtype=DTYPES[dtype]).eval()
    assert torch.equal(_outputs(plain, family), _outputs(model, family))


@pytest.mark.parametrize("family,dtype,codec", CASES)
def test_to_linear_per_layer(family, dtype, codec):
    for _, layer in packed_layers(_case(family, dtype, codec)):
        lin = layer.to_linear()
        x = torch.randn(3, layer.in_features, dtype=DTYPES[dtype])
        with torch.no_grad():
            assert rel_mse(lin(x), layer(x)) < 1e-4
        assert isinstance(layer, PackedLinear)


@pytest.mark.parametrize("family,dtype,codec", CAUSAL)
def test_generate_greedy_sampling_static_cache_streamer(family, dtype, codec):
    model, tok = _case(family, dtype, codec), char_tokenizer()
    x = tok(PROMPT, return_tensors="pt")
    kw = dict(max_new_tokens=6, min_new_tokens=6, pad_token_id=3)
    greedy = model.generate(**x, do_sample=False, **kw)
    assert greedy.shape == (1, x["input_ids"].shape[1] + 6)
    assert torch.equal(model.generate(**x, do_sample=False, cache_implementation="static", **kw), greedy)
    torch.manual_seed(1)
    a = model.generate(**x, do_sample=True, top_k=20, **kw)
    torch.manual_seed(1)
    assert torch.equal(model.generate(**x, do_sample=True, top_k=20, **kw), a)

    class Collect(TextStreamer):
        text = ""

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            Collect.text += text

    model.generate(**x, do_sample=False, streamer=Collect(tok, skip_prompt=True), **kw)
    assert Collect.text == tok.decode(greedy[0, x["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.mark.parametrize("family,dtype,codec", CASES)
def test_pipeline(family, dtype, codec):
    model, tok = _case(family, dtype, codec), char_tokenizer()
    if family == "bert":
        feats = pipeline("feature-extraction", model=model.bert, tokenizer=tok)("the lazy fox", return_tensors=True)
        expected = model.bert(**tok("the lazy fox", return_tensors="pt")).last_hidden_state
        assert torch.equal(feats, expected.detach())
        return
    out = pipeline("text-generation", model=model, tokenizer=tok)(PROMPT, max_new_tokens=5, do_sample=False)
    greedy = model.generate(**tok(PROMPT, return_tensors="pt"), max_new_tokens=5, do_sample=False, pad_token_id=3)
    assert out[0]["generated_text"] == tok.decode(greedy[0], skip_special_tokens=True)


@pytest.mark.parametrize("family,dtype,codec", CASES)
def test_peft_lora_kbit_training_save_reload_merge(tmp_path, family, dtype, codec):
    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training

    from hf_rbe.training import merge_and_unload

    model = prepare_model_for_kbit_training(_copy(family, dtype, codec), use_gradient_checkpointing=True)
    model.train()
    # seed64's RBE residual is a Linear inside the seed64 layer: "all-linear" would wrap both
    extra = {"exclude_modules": r".*\.residual"} if codec == "seed64" else {}
    peft = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False,
                                            task_type="SEQ_CLS" if family == "bert" else "CAUSAL_LM", **extra))
    codes_before = {n: t.clone() for n, t in peft.state_dict().items() if not t.is_floating_point()}
    batch = _inputs(family)
    labels = torch.tensor([0, 1]) if family == "bert" else batch["input_ids"]
    peft(**batch, labels=labels).loss.backward()
    lora = [p for n, p in peft.named_parameters() if "lora_" in n]
    assert lora and all(p.grad is not None and torch.isfinite(p.grad).all() for p in lora)
    assert any(p.grad.abs().sum() > 0 for p in lora)
    after = peft.state_dict()
    assert codes_before and all(torch.equal(t, after[n]) for n, t in codes_before.items())  # codes and seeds fixed
    peft.eval()
    with torch.no_grad():
        adapted = peft(**batch).logits
    peft.save_pretrained(tmp_path / "adapter")
    base = prepare_model_for_kbit_training(_copy(family, dtype, codec), use_gradient_checkpointing=True)
    again = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(again(**batch).logits, adapted)
    merged = merge_and_unload(again)
    assert list(packed_layers(merged))  # merged back into codes, not into float weights
    with torch.no_grad():
        assert torch.isfinite(merged(**batch).logits).all()


@pytest.mark.parametrize("family,dtype,codec", CASES)
def test_trainer_one_step_in_qat_mode(tmp_path, family, dtype, codec):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    if codec == "seed64":
        with pytest.raises(ValueError, match="qat=True is not available with codec='seed64'"):
            _config(codec, qat=True)
        return
    model = _auto(family).from_pretrained(_source(family), dtype=DTYPES[dtype], quantization_config=_config(codec, qat=True))
    ids = _inputs(family)
    rows = {"input_ids": ids["input_ids"].tolist(), "attention_mask": ids["attention_mask"].tolist(),
            "labels": [0, 1] if family == "bert" else ids["input_ids"].tolist()}
    latent = [p for n, p in model.named_parameters() if p.requires_grad and n.endswith("weight")]
    before = [p.detach().clone() for p in latent]
    args = TrainingArguments(tmp_path, max_steps=1, per_device_train_batch_size=2, learning_rate=1e-2,
                             report_to=[], save_strategy="no", use_cpu=True)
    Trainer(model=model, args=args, train_dataset=Dataset.from_dict(rows)).train()
    assert any(not torch.equal(a, b) for a, b in zip(before, latent))


@pytest.mark.parametrize("device_map", ["cpu", "auto"])
@pytest.mark.parametrize("family,dtype,codec", [p for p in CASES if p.values[1] == "fp32"])
def test_device_map(family, dtype, codec, device_map):
    model = _auto(family).from_pretrained(_source(family), dtype=DTYPES[dtype], quantization_config=_config(codec),
                                          device_map=device_map).eval()
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert torch.equal(_outputs(model, family), _outputs(_case(family, dtype, codec), family))


@pytest.mark.parametrize("family,dtype,codec", [p for p in CASES if p.values[1] == "fp32" and p.values[0] == "llama"])
def test_torch_compile_equals_eager(family, dtype, codec):
    # dynamo's full graph (no break around the packed layers); tests/hf/test_compile.py runs inductor
    model = _case(family, dtype, codec)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    assert rel_mse(_outputs(compiled, family), _outputs(model, family)) < 1e-10
