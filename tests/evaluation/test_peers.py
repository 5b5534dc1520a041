"""The calibrated peers of hf-rbe compare (GPTQ, AutoRound): run through their libraries, sized from
what their packed checkpoints store, and their committed rows traceable to the command that measured them."""

import json
from pathlib import Path

import pytest
import torch
from conftest import char_tokenizer, tiny_llama_config

ROOT = Path(__file__).resolve().parents[2]


def test_stored_size_counts_every_tensor_of_the_quantized_layers(tmp_path):
    from safetensors.torch import save_file

    from hf_rbe.evaluation.compare.peers import stored_size

    save_file({"layers.0.q.qweight": torch.zeros(8, 64, dtype=torch.int32),  # 8*64*32 bits
               "layers.0.q.scales": torch.zeros(2, 64, dtype=torch.float32),  # a float: counted at 16 bits
               "layers.0.q.bias": torch.zeros(64),  # not a weight's storage
               "layers.0.qq.qweight": torch.zeros(4, 64, dtype=torch.int32),  # another layer, not asked for
               "embed.weight": torch.zeros(100, 64)}, str(tmp_path / "model.safetensors"))
    got = stored_size(tmp_path, {"layers.0.q": 64 * 64})
    assert got["quantized_weights"] == 64 * 64
    assert got["bits"] == 8 * 64 * 32 + 2 * 64 * 16
    assert got["bytes_on_disk"] == (tmp_path / "model.safetensors").stat().st_size
    with pytest.raises(RuntimeError, match="no tensor of the quantized layers"):
        stored_size(tmp_path, {"layers.1.q": 1})


@pytest.fixture(scope="module")
def tiny_llama_with_tokenizer(tmp_path_factory, corpora):  # noqa: ANN001, ANN201
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny_llama_tok")
    LlamaForCausalLM(tiny_llama_config()).save_pretrained(out)
    char_tokenizer().save_pretrained(out)
    return str(out)


def _levels_per_group(w: torch.Tensor, group: int) -> int:
    return max(len(torch.unique(g)) for g in w.reshape(-1, group))


def _check_peer(method_name: str, path: str, bits: int) -> None:
    from transformers import AutoModelForCausalLM

    from hf_rbe.evaluation.compare.methods import methods
    from hf_rbe.evaluation.compare.peers import GROUP
    from hf_rbe.evaluation.compare.run import _load

    fp = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model, row = _load(next(m for m in methods(names=[method_name])), path, AutoModelForCausalLM)
    n_linear = 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128)  # the lm_head stays unquantized, as for every row
    assert row["quantized_weights"] == n_linear
    # bits-bit codes, plus per group of GROUP at least a 16-bit scale: the packed checkpoint's tensors
    assert bits + 16 / GROUP <= row["bits_per_weight"] <= bits + 3 * 16 / GROUP
    q, ref = model.model.layers[0].mlp.up_proj.weight.detach(), fp.model.layers[0].mlp.up_proj.weight.detach()
    assert _levels_per_group(q, GROUP) <= 2**bits  # what it computes with is on the grid it stores
    assert 0 < float((q - ref).norm() / ref.norm()) < 0.5  # quantized, yet still the model's weights


def test_autoround_row_runs_its_library_on_the_calibration_windows(tiny_llama_with_tokenizer, monkeypatch):
    pytest.importorskip("auto_round")
    from hf_rbe.evaluation.compare import peers

    monkeypatch.setattr(peers, "AUTOROUND_ITERS", 2)  # the library's loop, briefly: this checks wiring and sizing
    _check_peer(f"AutoRound W4 g{peers.GROUP}", tiny_llama_with_tokenizer, 4)


def test_gptq_row_runs_llm_compressor_on_the_calibration_windows(tiny_llama_with_tokenizer):
    pytest.importorskip("llmcompressor")  # its own environment: .ci/llmcompressor-env
    from hf_rbe.evaluation.compare.peers import GROUP

    _check_peer(f"GPTQ W3 g{GROUP}", tiny_llama_with_tokenizer, 3)


def test_committed_peer_rows_name_the_run_that_measured_them():
    """No peer row in results/compare.json without a recorded ``hf-rbe compare`` run that selected it."""
    from hf_rbe.evaluation.compare.methods import CALIBRATED_PEERS, methods

    result = json.loads((ROOT / "results" / "compare.json").read_text())
    runs = [*result["meta"].get("earlier", []), result["meta"]]
    names = {m.name for m in methods(list(CALIBRATED_PEERS))}
    for row in (r for r in result["rows"] if r["family"] in CALIBRATED_PEERS):
        assert row["method"] in names, row["method"]
        assert any(r["command"].startswith("hf-rbe compare") and set(r.get("families") or [])
                   & {row["family"], row["method"]} for r in runs), row["method"]
