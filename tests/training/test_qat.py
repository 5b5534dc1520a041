"""QAT: the straight-through estimator, gradient routing, freeze/save/reload, Trainer without PEFT."""

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from hf_rbe import RBEConfig, RBELinear
from hf_rbe.training import RBEQATLinear, ReencodeCallback, freeze, prepare_qat, reencode, straight_through


def test_straight_through_estimator_by_hand():
    latent = torch.tensor([0.3, -1.2], requires_grad=True)
    quantized = torch.tensor([0.5, -1.0])
    y = straight_through(latent, quantized)
    assert torch.equal(y.detach(), quantized)  # forward: the quantized value
    (y * torch.tensor([2.0, -3.0])).sum().backward()
    assert torch.equal(latent.grad, torch.tensor([2.0, -3.0]))  # backward: identity


def test_gradients_reach_latent_weights_not_codes(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=RBEConfig.from_preset("rbe-2.5", qat=True))
    layer = model.model.layers[0].mlp.up_proj
    assert isinstance(layer, RBEQATLinear) and isinstance(layer.codes, RBELinear)
    ids = torch.tensor([[1, 5, 9, 33, 70]])
    model(ids, labels=ids).loss.backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in layer.codes.parameters())
    # the forward pass sees exactly the decoded codes
    x = torch.randn(3, 64)
    assert torch.allclose(layer(x), x @ layer.codes.dequantize().T, atol=1e-6)
    with torch.no_grad():  # after the latent moves and the codes are refreshed, forward follows them
        layer.weight.mul_(-1.5)
        before = layer(x)
        layer.reencode()
        assert not torch.allclose(layer(x), before)
        assert torch.allclose(layer(x), x @ layer.codes.dequantize().T, atol=1e-6)


def test_freeze_save_reload_identical(tiny_llama_dir, tmp_path):
    ref = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=RBEConfig.from_preset("rbe-2.5"))
    prepare_qat(model, latent_from=ref)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(1.1)  # pretend training moved it
    assert reencode(model) == 14
    freeze(model)
    assert isinstance(model.model.layers[0].mlp.up_proj, RBELinear)
    ids = torch.tensor([[1, 5, 9, 33, 70]])
    with torch.no_grad():
        before = model(ids).logits
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, before)


def test_trainer_runs_qat_without_peft(tiny_llama_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=RBEConfig.from_preset("rbe-2.5", qat=True))
    start = model.model.layers[1].self_attn.q_proj.weight.detach().clone()
    ids = (torch.arange(16)[None] + torch.arange(8)[:, None]) % 128
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4, learning_rate=1e-3,
                             report_to=[], save_strategy="no", use_cpu=True, logging_steps=1)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[ReencodeCallback(every=1)])
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert not torch.equal(model.model.layers[1].self_attn.q_proj.weight.detach(), start)


def test_qat_checkpoint_saves_and_resumes(tiny_llama_dir, tmp_path):
    ids = (torch.arange(16)[None] + torch.arange(8)[:, None]) % 128
    data = Dataset.from_dict({"input_ids": ids.tolist(), "labels": ids.tolist()})

    def run(max_steps, resume=None):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_pretrained(
            tiny_llama_dir, quantization_config=RBEConfig.from_preset("rbe-2.5", qat=True))
        args = TrainingArguments(output_dir=str(tmp_path / "ckpt"), max_steps=max_steps, per_device_train_batch_size=4,
                                 learning_rate=1e-3, report_to=[], save_strategy="steps", save_steps=2, use_cpu=True,
                                 logging_steps=1, seed=0)
        Trainer(model=model, args=args, train_dataset=data).train(resume_from_checkpoint=resume)
        return model

    straight = run(4)
    w = straight.model.layers[0].mlp.up_proj.weight.detach().clone()
    assert (tmp_path / "ckpt" / "checkpoint-2").exists()
    resumed = run(4, resume=str(tmp_path / "ckpt" / "checkpoint-2"))
    assert torch.allclose(resumed.model.layers[0].mlp.up_proj.weight.detach(), w, atol=1e-6)


def test_train_quantizer_flag_trains_scales_and_tables(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from hf_rbe.training import RBEQATLinear, TrainableTables, freeze

    cfg = RBEConfig.from_preset("rbe-3", qat=True, qat_train_quantizer=True)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=cfg)
    layers = [m for m in model.modules() if isinstance(m, RBEQATLinear)]
    assert layers and all(m.train_quantizer for m in layers)
    tables = {id(m.trainable_tables()) for m in layers}
    assert len(tables) == len({m.codes.table_key for m in layers})  # one trainable copy per shared table
    n_table_params = sum(1 for n, _ in model.named_parameters() if ".tables." in n)
    assert n_table_params == 2 * len(tables)  # table + gain curves, registered once each

    ids = torch.randint(0, 128, (2, 16))
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    layer = layers[0]
    assert layer.weight.grad is not None and layer.scale.grad is not None
    assert layer.trainable_tables().table.grad.abs().sum() > 0
    assert all(p.grad is None for p in layer.codes.parameters())  # the integer codes stay frozen

    # one optimizer step on scales and tables only moves the decoded weight
    before = layer.decoded_trainable().detach().clone()
    opt = torch.optim.SGD([p for n, p in model.named_parameters() if "scale" in n or ".tables." in n], lr=1.0)
    opt.step()
    assert not torch.equal(layer.decoded_trainable().detach(), before)
    with torch.no_grad():  # rows that drift off unit length (Adam over many steps) decode as their directions
        decoded = layer.decoded_trainable().clone()
        layer.trainable_tables().table.mul_(1.7)
        torch.testing.assert_close(layer.decoded_trainable(), decoded)
    trained_table = layer.trainable_tables().tables()["table"].detach().clone()

    model.eval()
    with torch.no_grad():
        trained_logits = model(ids).logits
    frozen = freeze(model)
    assert not any(isinstance(m, RBEQATLinear) for m in frozen.modules())
    owner = next(m for m in frozen.modules() if isinstance(m, RBELinear) and m.owns_table
                 and m.table_key == layer.codes.table_key)
    torch.testing.assert_close(owner.table.float(), trained_table)  # the trained table is what gets saved
    with torch.no_grad():
        ref = frozen(ids).logits
    # freeze keeps the trained scales (rounded to fp16) instead of refitting them
    torch.testing.assert_close(ref, trained_logits, rtol=0, atol=2e-3)
    frozen.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(again.model.layers[0].mlp.up_proj, RBELinear)  # frozen reloads frozen, not as a new QAT run
    with torch.no_grad():
        assert torch.equal(again(ids).logits, ref)
    assert isinstance(TrainableTables(owner).table, torch.nn.Parameter)
