"""A checkpoint three times larger than the memory calibration may use is quantized by the streaming path.

The memory a job needs under a cap is its anonymous resident memory (``MemoryProfile(anonymous=True)``:
clean library and checkpoint pages are dropped and reread under a cap). Libraries, compiled kernels
and caches are the same for any model, so the child process quantizes a one-block model of the
same shapes first and the cap applies to what the deep model's calibration adds on top.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import calibration_config, tiny_llama_config
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from hf_rbe.core.rbe_linear import RBELinear

# What calibration adds does not grow with depth (one block at a time); it moves by a fifth between
# runs (the end-to-end phase's heap), so the model is deep enough that the worst run seen still
# leaves room under the three-times bound.
BLOCKS = 72
SHAPE = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=4,
             max_position_embeddings=64, tie_word_embeddings=True)
# calibrated with block and end-to-end fine-tuning: every phase runs; with no block activations kept by
# the end-to-end fine-tune (the budget it may fill instead is a fixed allowance: test_finetune.py)
SETTINGS = dict(calibration_seqlen=64, calibration_finetune_steps=2, calibration_e2e_steps=2, calibration_e2e_memory=0)

CHILD = """
import json, sys
from conftest import calibration_config
from hf_rbe import quantize_checkpoint
from hf_rbe.evaluation.memory import MemoryProfile
warm, src, out, settings = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
quantize_checkpoint(warm, out + "-warm", calibration_config(**settings))
with MemoryProfile(anonymous=True) as prof:
    quantize_checkpoint(src, out, calibration_config(**settings))
print(json.dumps(prof.as_dict()))
"""


def _save(path: Path, blocks: int) -> int:
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(num_hidden_layers=blocks, **SHAPE)).save_pretrained(path, max_shard_size="20MB")
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="anonymous resident memory is read on Linux")
def test_a_checkpoint_three_times_the_cap_is_quantized_and_reloads(tmp_path):
    _save(tmp_path / "warm", 1)
    size = _save(tmp_path / "src", BLOCKS)
    paths = [str(Path(__file__).parents[2]), *filter(None, [os.environ.get("PYTHONPATH")])]  # conftest's folder
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    res = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "warm"), str(tmp_path / "src"),
                          str(tmp_path / "out"), json.dumps(SETTINGS)], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    prof = json.loads(res.stdout.strip().splitlines()[-1])
    added = (prof["peak_mib"] - prof["base_mib"]) * 2**20
    assert size >= 3 * added, f"checkpoint {size / 2**20:.0f} MiB, calibration added {added / 2**20:.0f} MiB: {prof}"

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")  # a plain load: an ordinary RBE checkpoint
    coded = [m for m in model.modules() if isinstance(m, RBELinear)]
    assert len(coded) == BLOCKS * 7
    assert model.config.quantization_config.calibrated_with["e2e_steps"] == SETTINGS["calibration_e2e_steps"]
    x = calibration_config().tokenizer("the quick brown fox").input_ids
    with torch.no_grad():
        assert torch.isfinite(model(x).logits).all()
