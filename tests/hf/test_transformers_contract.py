"""The transformers internals hf-rbe relies on, one test each, so that a transformers release that
changes one fails here, loudly and by name, instead of somewhere downstream (docs/design.md,
"Where hf-rbe reaches into transformers", says why each is needed)."""

import inspect
import subprocess
import sys

import pytest
from conftest import tiny_llama_config
from torch import nn

import hf_rbe  # noqa: F401  (registers the quantizer)


def test_quantizer_registry_and_the_methods_the_quantizer_overrides():
    from transformers.quantizers import auto
    from transformers.quantizers.base import HfQuantizer

    for name in ("AUTO_QUANTIZATION_CONFIG_MAPPING", "AUTO_QUANTIZER_MAPPING", "register_quantization_config",
                 "register_quantizer"):
        assert hasattr(auto, name), name
    for name in ("_process_model_before_weight_loading", "_process_model_after_weight_loading",
                 "param_needs_quantization", "get_quantize_ops", "get_state_dict_and_metadata", "_dequantize",
                 "validate_environment"):
        assert hasattr(HfQuantizer, name), name
    from transformers.core_model_loading import ConversionOps  # quantize-on-load's op (``hf.convert``)

    assert "convert" in vars(ConversionOps) or hasattr(ConversionOps, "convert")


def test_the_import_hook_registers_rbe_when_transformers_is_imported_later():
    # hf_rbe/__init__ wraps transformers' module loader so that `import hf_rbe` alone stays light
    code = ("import sys, hf_rbe; assert 'transformers' not in sys.modules;"
            "from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING, AUTO_QUANTIZATION_CONFIG_MAPPING;"
            "from transformers import AutoConfig;"
            "assert AUTO_QUANTIZER_MAPPING['rbe'].__name__ == 'RBEHfQuantizer';"
            "assert AUTO_QUANTIZATION_CONFIG_MAPPING['rbe'].__name__ == 'RBEConfig';"
            "assert AutoConfig.for_model('hb_bert').model_type == 'hb_bert'; print('registered')")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "registered" in res.stdout, res.stderr[-2000:]


def test_loading_hands_the_quantizer_the_checkpoint_files(tiny_llama_dir, tmp_path):
    # integrity checks read the safetensors headers before any value is loaded (``hf.integrity``)
    from transformers import AutoModelForCausalLM

    from hf_rbe import RBEConfig

    AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=RBEConfig.from_preset("v2-2")) \
        .save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert again.hf_quantizer.checkpoint is not None and again.hf_quantizer.checkpoint.layers


def test_the_per_instance_save_and_upload_hooks_keep_their_signatures():
    # ``hf.saving.attach`` wraps these two on each RBE model (card, atomic save, recorded dtype)
    from transformers import PreTrainedModel

    upload = inspect.signature(PreTrainedModel._upload_modified_files).parameters
    assert list(upload)[:3] == ["self", "working_dir", "repo_id"]
    save = inspect.signature(PreTrainedModel.save_pretrained).parameters
    assert list(save)[:2] == ["self", "save_directory"] and "is_main_process" in save and "push_to_hub" in save
    push = inspect.getsource(PreTrainedModel.push_to_hub)
    assert "self._upload_modified_files(" in push and "self.save_pretrained(" in push


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_embeddings_and_heads_are_plain_modules(family):
    # ``core.stored.store_embeddings`` swaps their ``__class__`` for half-precision twins: only sound
    # (and only done) when they are exactly nn.Embedding / nn.Linear
    from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaForCausalLM

    model = {"llama": lambda: LlamaForCausalLM(tiny_llama_config()),
             "gpt2": lambda: GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=1, n_head=4, vocab_size=128)),
             "bert": lambda: BertModel(BertConfig(vocab_size=128, hidden_size=64, num_hidden_layers=1,
                                                  num_attention_heads=2, intermediate_size=128))}[family]()
    assert type(model.get_input_embeddings()) is nn.Embedding
    head = model.get_output_embeddings() if family != "bert" else None
    assert head is None or type(head) is nn.Linear


def test_tied_weights_are_listed_target_to_source():
    # ``hf.replace.share_head_codes`` takes a coded head out of this map (it would tie the head to an
    # embedding parameter that no longer exists)
    from transformers import LlamaForCausalLM

    m = LlamaForCausalLM(tiny_llama_config(tie_word_embeddings=True))
    assert m.all_tied_weights_keys == {"lm_head.weight": "model.embed_tokens.weight"}
    assert m.lm_head.weight is m.model.embed_tokens.weight


def test_module_skip_helpers():
    # ``hf.replace.modules_to_skip`` builds on transformers' own skip policy
    from transformers import LlamaForCausalLM
    from transformers.quantizers.base import get_keys_to_not_convert
    from transformers.quantizers.quantizers_utils import should_convert_module

    m = LlamaForCausalLM(tiny_llama_config())
    assert "lm_head" in get_keys_to_not_convert(m)
    assert not should_convert_module("lm_head", ["lm_head"]) and should_convert_module("model.layers.0.mlp", ["lm_head"])
