"""LoRA through PEFT + Trainer on an RBE model; adapters save/reload; merge into codes."""

import pytest
import torch

pytest.importorskip("peft")
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from hf_rbe import RBEConfig, RBELinear
from hf_rbe.training import merge_and_unload


def _data(n=64, seq=16):
    g = torch.Generator().manual_seed(0)
    # a learnable pattern: each sequence counts upward from a random start
    starts = torch.randint(4, 100, (n, 1), generator=g)
    ids = (starts + torch.arange(seq)) % 128
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})


def test_lora_trainer_merge(tiny_llama_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=RBEConfig())
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=0.0))
    wrapped = [m for m in peft_model.modules() if hasattr(m, "lora_A") and isinstance(m.get_base_layer(), RBELinear)]
    assert len(wrapped) == 14
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=20, per_device_train_batch_size=8,
                             learning_rate=1e-2, logging_steps=1, report_to=[], save_strategy="no", use_cpu=True)
    trainer = Trainer(model=peft_model, args=args, train_dataset=_data())
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 20
    assert sum(losses[-5:]) / 5 < 0.95 * sum(losses[:5]) / 5, losses

    # only LoRA tensors changed
    for n, p in peft_model.named_parameters():
        if "lora_" in n:
            continue
        base = n.replace("base_model.model.", "").replace(".base_layer", "")
        assert torch.equal(p.detach(), frozen[base]), n

    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    peft_model.eval()
    with torch.no_grad():
        with_adapter = peft_model(ids).logits
    peft_model.save_pretrained(tmp_path / "adapter")
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=RBEConfig())
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, with_adapter, atol=1e-5)

    merged = merge_and_unload(peft_model)
    assert isinstance(merged.model.layers[0].self_attn.q_proj, RBELinear)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        out = merged(ids).logits
    # merged codes re-encode W + BA: close to the adapter model, far closer than the un-adapted base
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=RBEConfig())(ids).logits
    err_merged = (out - with_adapter).pow(2).mean()
    err_plain = (plain - with_adapter).pow(2).mean()
    assert err_merged < 0.5 * err_plain, (err_merged, err_plain)
