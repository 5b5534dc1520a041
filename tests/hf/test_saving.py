"""What saving does for an RBE model (``hf_rbe.hf.saving``): a failed save leaves the old checkpoint,
no stale shards, a file as target refused, dequantized models save as plain ones, pickle and
``torch.save`` round trips."""

import errno
import io
import pickle

import pytest
import torch
from conftest import edited_copy as _copy
from conftest import logits_of as _logits
from transformers import AutoModelForCausalLM

from hf_rbe import RBEConfig, RBELinear


@pytest.mark.parametrize("preset", ["v2-3", "rbe-5"])
def test_pickle_and_torch_save_round_trip(saved, tmp_path, preset):
    d, ref = saved[preset]
    m = AutoModelForCausalLM.from_pretrained(d)
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    again = torch.load(buf, weights_only=False)  # the user's own pickle: their choice to unpickle it
    assert torch.equal(_logits(again), ref)
    assert torch.equal(_logits(pickle.loads(pickle.dumps(m))), ref)
    again.save_pretrained(tmp_path)  # the card hook survived and points at the copy
    assert (tmp_path / "README.md").exists()
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path)), ref)


def test_a_failed_save_over_a_checkpoint_leaves_the_old_one(saved, tiny_llama_dir, tmp_path, monkeypatch):
    import safetensors.torch
    import transformers.modeling_utils

    d, ref = saved["v2-3"]
    target = _copy(d, tmp_path / "ckpt")
    (target / "tokenizer.json").write_text("{}")  # a file of the user's: kept
    newer = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, quantization_config=RBEConfig.from_preset("v2-2"))
    real = safetensors.torch.save_file

    def disk_full(tensors, filename, metadata=None):
        real(dict(list(tensors.items())[:3]), filename, metadata=metadata)  # part of the file, then the error
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", disk_full)
    with pytest.raises(OSError, match="No space"):
        newer.save_pretrained(target)
    monkeypatch.undo()
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(target)), ref)
    assert (target / "tokenizer.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no staging directory left behind
    newer.save_pretrained(target)  # and a save that succeeds replaces it
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(target)), _logits(newer))
    assert (target / "tokenizer.json").exists()


def test_sharded_then_single_file_save_leaves_no_stale_shards(saved, tmp_path):
    d, ref = saved["v2-3"]
    m = AutoModelForCausalLM.from_pretrained(d)
    m.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    m.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.glob("model*")) == ["model.safetensors"]
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(tmp_path)), ref)


def test_saving_onto_a_file_is_refused(saved, tmp_path):
    m = AutoModelForCausalLM.from_pretrained(saved["v2-3"][0])
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError):
        m.save_pretrained(tmp_path / "f")


def test_dequantize_then_save(saved, tmp_path):
    d, ref = saved["v2-3"]
    m = AutoModelForCausalLM.from_pretrained(d)
    m.dequantize()
    m.save_pretrained(tmp_path)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert not any(isinstance(x, RBELinear) for x in plain.modules())
    assert torch.allclose(_logits(plain), ref, atol=1e-4)
