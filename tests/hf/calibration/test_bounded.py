"""Calibration in bounded memory: no phase holds more than one block's float weights, the streaming
path writes what the in-memory path writes bit for bit, and a stopped run resumes to the same result."""

import json
from pathlib import Path

import pytest
import torch
from conftest import calibration_config, tiny_llama_config
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from hf_rbe import RBEConfig, quantize_checkpoint, quantize_model
from hf_rbe.core.errors import ConfigError
from hf_rbe.hf import quantizer
from hf_rbe.hf.calibration import work
from hf_rbe.hf.calibration.capture import find_blocks
from hf_rbe.hf.calibration.phases import listen
from hf_rbe.hf.calibration.weights import BlockWeights, Unloaded

#: Every phase of a calibration with Fisher weighting, bit allocation, block and end-to-end fine-tuning.
PHASES = ("windows", "fisher", "blocks", "hessians", "full-precision path", "encode", "block fine-tune", "propagate",
          "teacher", "head", "end-to-end")


def _deep_model(seed: int = 0) -> LlamaForCausalLM:
    """``structured_model`` with four blocks: enough to tell one block's weights from the model's."""
    torch.manual_seed(seed)
    m = LlamaForCausalLM(tiny_llama_config(num_hidden_layers=4))
    with torch.no_grad():
        m.model.embed_tokens.weight.copy_(torch.randn(128, 6) @ torch.randn(6, 64))
    return m.eval()


def _full_config(**kw):  # type: ignore[no-untyped-def]
    return calibration_config(calibration_fisher=True, target_bits=6.0, calibration_finetune_steps=2,
                              calibration_e2e_steps=2, **kw)


def _float_blocks(model: nn.Module) -> int:
    """How many blocks hold float Linear weights in memory."""
    _, blocks = find_blocks(model)
    return sum(any(type(m) is nn.Linear and m.weight.device.type != "meta" for m in b.modules()) for b in blocks)


@pytest.fixture(scope="module")
def phase_peaks(tmp_path_factory):
    """{phase: the most blocks holding float weights seen while it ran}, from a calibration on load."""
    src = tmp_path_factory.mktemp("src")
    _deep_model().save_pretrained(src)
    peaks: dict[str, int] = {}
    open_phases: list[str] = []
    model_box: list[nn.Module] = []

    def seen() -> None:
        if model_box:
            for name in open_phases:
                peaks[name] = max(peaks.get(name, 0), _float_blocks(model_box[0]))

    def on_phase(name: str, started: bool) -> None:
        seen()
        open_phases.append(name) if started else open_phases.remove(name)
        peaks.setdefault(name, 0)

    materialize = BlockWeights.materialize

    def spy(self, module, prefix, device):  # type: ignore[no-untyped-def]
        out = materialize(self, module, prefix, device)
        seen()
        return out

    calibrate = quantizer.quantize_calibrated

    def keep_model(model, *args, **kwargs):  # type: ignore[no-untyped-def]
        model_box.append(model)
        return calibrate(model, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp, listen(on_phase):
        mp.setattr(BlockWeights, "materialize", spy)
        mp.setattr(quantizer, "quantize_calibrated", keep_model)
        mp.setattr(nn.Module, "__call__", _counting_call(seen))
        AutoModelForCausalLM.from_pretrained(src, quantization_config=_full_config())
    return peaks


def _counting_call(seen):  # type: ignore[no-untyped-def]
    """``nn.Module.__call__`` that also checks the float blocks before every module call (every phase,
    however deep inside it)."""
    call = nn.Module.__call__

    def wrapped(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        if type(self).__name__.endswith("DecoderLayer"):
            seen()
        return call(self, *args, **kwargs)

    return wrapped


@pytest.mark.parametrize("phase", PHASES)
def test_no_phase_holds_more_than_one_blocks_float_weights(phase_peaks, phase):
    assert phase in phase_peaks, f"phase {phase!r} did not run"
    assert phase_peaks[phase] <= 1, f"{phase} held {phase_peaks[phase]} blocks' float weights"


def _tensors(out: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}


def _same_checkpoint(a: Path, b: Path) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert ta.keys() == tb.keys()
    assert [k for k in ta if not torch.equal(ta[k], tb[k])] == []
    qa = json.loads((a / "config.json").read_text())["quantization_config"]
    qb = json.loads((b / "config.json").read_text())["quantization_config"]
    assert qa == qb


def test_streaming_writes_what_the_in_memory_path_writes(tmp_path):
    src = tmp_path / "src"
    _deep_model().save_pretrained(src)
    cfg = calibration_config(calibration_finetune_steps=2, calibration_e2e_steps=2)
    quantize_checkpoint(src, tmp_path / "streamed", cfg, max_shard_size="50KB")
    assert len(list((tmp_path / "streamed").glob("*.safetensors"))) > 1  # sharded
    assert not (tmp_path / "streamed" / ".rbe-calibration").exists()
    quantize_model(AutoModelForCausalLM.from_pretrained(src), cfg).save_pretrained(tmp_path / "in_memory")
    _same_checkpoint(tmp_path / "streamed", tmp_path / "in_memory")


def test_streaming_equals_in_memory_on_smollm2(tmp_path, corpora):
    """Real weights and tokenizer: SmolLM2-135M's first four blocks, calibrated on Wikipedia."""
    from transformers import AutoTokenizer

    from hf_rbe.data.fetch import ensure

    path = ensure("smollm2")["smollm2"]
    src = tmp_path / "src"
    AutoModelForCausalLM.from_pretrained(path, num_hidden_layers=4, dtype=torch.float32).save_pretrained(src)
    AutoTokenizer.from_pretrained(path).save_pretrained(src)
    cfg = RBEConfig.from_preset("v2-3", dataset="wikipedia", calibration_samples=4, calibration_seqlen=64,
                                calibration_finetune_steps=2, calibration_e2e_steps=2)
    quantize_checkpoint(src, tmp_path / "streamed", cfg)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    quantize_model(model, cfg, tokenizer=AutoTokenizer.from_pretrained(src)).save_pretrained(tmp_path / "in_memory")
    _same_checkpoint(tmp_path / "streamed", tmp_path / "in_memory")


def test_a_stopped_run_resumes_to_what_an_uninterrupted_run_writes(tmp_path, monkeypatch):
    src = tmp_path / "src"
    _deep_model().save_pretrained(src)
    cfg = calibration_config(calibration_finetune_steps=2, calibration_e2e_steps=2)
    quantize_checkpoint(src, tmp_path / "whole", cfg)
    save = work.WorkDir.save

    def stop_after_block_1(self, index, *args):  # type: ignore[no-untyped-def]
        save(self, index, *args)
        if index == 1:
            raise KeyboardInterrupt("stopped")

    monkeypatch.setattr(work.WorkDir, "save", stop_after_block_1)
    with pytest.raises(KeyboardInterrupt):
        quantize_checkpoint(src, tmp_path / "resumed", cfg)
    assert json.loads((tmp_path / "resumed" / ".rbe-calibration" / "progress.json").read_text())["blocks"] == 2
    monkeypatch.setattr(work.WorkDir, "save", save)
    calibrated: list[str] = []
    materialize = BlockWeights.materialize
    monkeypatch.setattr(BlockWeights, "materialize", lambda self, m, prefix, d: (calibrated.append(prefix),
                                                                                   materialize(self, m, prefix, d)))
    quantize_checkpoint(src, tmp_path / "resumed", cfg)
    assert calibrated == ["model.layers.2", "model.layers.3"]  # the finished blocks were not calibrated again
    _same_checkpoint(tmp_path / "whole", tmp_path / "resumed")


def test_a_work_dir_of_another_calibration_is_refused(tmp_path, monkeypatch):
    src = tmp_path / "src"
    _deep_model().save_pretrained(src)
    monkeypatch.setattr(work.WorkDir, "save", lambda self, index, *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        quantize_checkpoint(src, tmp_path / "out", calibration_config(), keep_work_dir=True)
    monkeypatch.undo()
    (tmp_path / "out" / ".rbe-calibration" / "progress.json").write_text(json.dumps({"fingerprint": "x", "blocks": 1}))
    with pytest.raises(ConfigError, match="another calibration"):
        quantize_checkpoint(src, tmp_path / "out", calibration_config())


def test_unloaded_layers_say_so_if_called():
    layer = Unloaded(8, 4, True, torch.float32)
    assert layer.weight.shape == (4, 8) and layer.bias.shape == (4,) and not list(layer.parameters())
    with pytest.raises(RuntimeError, match="not loaded yet"):
        layer(torch.randn(1, 8))


