"""``quantize_embeddings``: the output head RBE-coded, a tied input embedding reading its codes, on
every path (in memory, on load, calibrated, reload), and what stays float."""

import copy

import pytest
import torch
from conftest import TEXT, CharTokenizer, assert_fresh_reload_identical, rel_mse, tiny_llama_config
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from hf_rbe import RBEConfig, RBELinear, quantize_model
from hf_rbe.core.packed import packed_size
from hf_rbe.core.rbe_embedding import RBEEmbedding
from hf_rbe.core.stored import StoredEmbedding
from hf_rbe.training import prepare_qat

IDS = torch.tensor([[1, 5, 9, 33, 70, 2, 5, 127]])


def _model(tied: bool = True, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=tied)).eval()


def _cfg(**kw) -> RBEConfig:
    return RBEConfig.from_preset("v2-4", quantize_embeddings=True, **kw)


def _keys(path) -> list[str]:
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return sorted(f.keys())


def test_a_tied_embedding_reads_the_heads_codes_and_is_stored_once(tmp_path):
    ref = _model()
    with torch.no_grad():
        target = ref(IDS).logits
    q = quantize_model(_model(), _cfg())
    head, emb = q.lm_head, q.model.embed_tokens
    assert isinstance(head, RBELinear) and isinstance(emb, RBEEmbedding) and emb.head is head
    with torch.no_grad():
        assert rel_mse(emb(IDS)[0], head.dequantize()[IDS[0]]) < 1e-12  # lookups are rows of the head
        logits = q(IDS).logits
    assert rel_mse(logits, target) < 0.05
    plain = quantize_model(_model(), RBEConfig.from_preset("v2-4"))
    assert packed_size(q)["state_dict_bytes"] < 0.75 * packed_size(plain)["state_dict_bytes"]
    q.save_pretrained(tmp_path / "q")
    keys = _keys(tmp_path / "q")
    assert "lm_head.weight" in keys and not any(k.startswith("model.embed_tokens") for k in keys)
    assert_fresh_reload_identical(tmp_path / "q", IDS, logits)


def test_quantize_on_load_matches_quantize_model_and_dequantize_reties(tmp_path):
    _model().save_pretrained(tmp_path / "src")
    with torch.no_grad():
        expected = quantize_model(_model(), _cfg())(IDS).logits
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "src", quantization_config=_cfg())
    assert isinstance(m.model.embed_tokens, RBEEmbedding) and m.model.embed_tokens.head is m.lm_head
    with torch.no_grad():
        assert torch.equal(m(IDS).logits, expected)
    m.tie_weights()  # transformers' own tying now finds the head tied to itself
    with torch.no_grad():
        assert torch.equal(m(IDS).logits, expected)
    dq = m.dequantize()
    assert type(dq.model.embed_tokens) is torch.nn.Embedding and dq.model.embed_tokens.weight is dq.lm_head.weight
    with torch.no_grad():
        assert rel_mse(dq(IDS).logits, expected) < 1e-10


def test_an_untied_embedding_stays_float_while_the_head_is_coded(tmp_path):
    q = quantize_model(_model(tied=False), _cfg(embedding_dtype="bfloat16"))
    assert isinstance(q.lm_head, RBELinear) and type(q.model.embed_tokens) is StoredEmbedding
    q.save_pretrained(tmp_path / "q")
    with torch.no_grad():
        logits = q(IDS).logits
    assert_fresh_reload_identical(tmp_path / "q", IDS, logits)
    default = quantize_model(_model(), RBEConfig.from_preset("v2-4"))  # off: both float, as before
    assert type(default.lm_head) is torch.nn.Linear and default.model.embed_tokens.weight is default.lm_head.weight


@pytest.mark.parametrize("tied", [True, False])
def test_calibration_encodes_the_head_on_its_inputs_and_ties_the_embedding(tmp_path, tied):
    settings = dict(dataset=TEXT, tokenizer=CharTokenizer(), calibration_samples=8, calibration_seqlen=32,
                    calibration_batch_size=4, calibration_finetune_steps=2, calibration_e2e_steps=4,
                    keep_calibration_statistics=True)
    q = quantize_model(_model(tied), _cfg(**settings))
    assert isinstance(q.lm_head, RBELinear)
    assert isinstance(q.model.embed_tokens, RBEEmbedding if tied else torch.nn.Embedding)
    assert not tied or q.model.embed_tokens.head is q.lm_head
    assert q.lm_head.calibration_hessian.shape == (64, 64)  # collected on the head's inputs
    with torch.no_grad():
        logits = q(IDS).logits
    assert torch.isfinite(logits).all()
    q.save_pretrained(tmp_path / "q")
    assert_fresh_reload_identical(tmp_path / "q", IDS, logits)


def test_the_shared_head_stays_frozen_in_qat_and_copies_keep_the_link():
    q = quantize_model(_model(), _cfg())
    twin = copy.deepcopy(q)
    assert twin.model.embed_tokens.head is twin.lm_head and twin.lm_head is not q.lm_head
    prepare_qat(q)
    assert type(q.lm_head) is RBELinear and q.model.embed_tokens.head is q.lm_head
    assert type(q.model.layers[0].mlp.down_proj) is not RBELinear


def test_bad_ids_are_refused():
    q = quantize_model(_model(), _cfg())
    for ids in (torch.tensor([[128]]), torch.tensor([[-1]])):
        with pytest.raises(IndexError, match=r"\[0, 128\)"):
            q.model.embed_tokens(ids)
    with pytest.raises(TypeError, match="token ids"):
        q.model.embed_tokens(torch.ones(1, 2))


def test_a_failure_after_the_embedding_was_shared_leaves_the_model_as_it_was(monkeypatch):
    import hf_rbe.hf.finish as finish

    m = _model()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    kinds, tying = {n: type(x) for n, x in m.named_modules()}, dict(m.all_tied_weights_keys)

    def fail(model):
        assert isinstance(model.model.embed_tokens, RBEEmbedding)  # the failure comes after the swap
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(finish, "model_dtype", fail)  # what finish_conversion does right after the swap
    with pytest.raises(RuntimeError, match="disk on fire"):
        quantize_model(m, _cfg())
    assert {n: type(x) for n, x in m.named_modules()} == kinds and m.all_tied_weights_keys == tying
    assert m.model.embed_tokens.weight is m.lm_head.weight
    assert all(torch.equal(m.state_dict()[k], v) for k, v in before.items())


def test_gpt2_ties_its_coded_head_and_lora_leaves_the_head_alone(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64, bos_token_id=0, eos_token_id=0)
    q = quantize_model(GPT2LMHeadModel(cfg).eval(), _cfg())
    assert isinstance(q.transformer.wte, RBEEmbedding) and q.transformer.wte.head is q.lm_head
    with torch.no_grad():
        logits = q(IDS).logits
    q.save_pretrained(tmp_path / "q")
    assert_fresh_reload_identical(tmp_path / "q", IDS, logits)
    lora = get_peft_model(quantize_model(_model(), _cfg()), LoraConfig(r=4, target_modules="all-linear"))
    adapted = [n for n, _ in lora.named_modules() if n.endswith("lora_A")]
    assert adapted and not any("lm_head" in n for n in adapted)
    lora(input_ids=IDS, labels=IDS).loss.backward()  # trains through the coded embedding and head


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_dequantized_model_with_a_tied_coded_head_saves_its_own_dtype(tmp_path, dtype):
    # the shared head's fp16 scales are the model's first parameters: not the dtype it computes in
    q = quantize_model(_model().to(dtype), _cfg())
    q.dequantize()
    q.save_pretrained(tmp_path)
    assert AutoModelForCausalLM.from_pretrained(tmp_path).dtype == dtype


@pytest.mark.parametrize("tied", [True, False])
def test_resizing_a_coded_vocabulary_is_refused_before_anything_changes(tied):
    from hf_rbe import ConfigError

    q = quantize_model(_model(tied=tied), _cfg())
    shapes = {k: v.shape for k, v in q.state_dict().items()}
    with torch.no_grad():
        ref = q(IDS).logits
    with pytest.raises(ConfigError, match="RBE-coded and cannot grow or shrink"):
        q.resize_token_embeddings(136)
    assert {k: v.shape for k, v in q.state_dict().items()} == shapes and q.config.vocab_size == 128
    with torch.no_grad():
        assert torch.equal(q(IDS).logits, ref)
    plain = quantize_model(_model(tied=tied), RBEConfig.from_preset("v2-4"))  # a float head resizes as usual
    plain.resize_token_embeddings(136)
    assert plain.get_output_embeddings().weight.shape[0] == 136
