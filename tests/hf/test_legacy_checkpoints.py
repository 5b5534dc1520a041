"""Checkpoints saved before the restructure (tests/fixtures, format v1) load with bit-identical logits."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import hf_rbe  # noqa: F401  (registers the quantizer)

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
CASES = sorted(p.name for p in FIXTURES.iterdir() if p.is_dir())


def test_every_fixture_is_found():
    assert CASES == ["v1_rbe_default", "v1_rbe_gpt2_fp8", "v1_rbe_per_layer_int4", "v1_seed64_rbe"]


@pytest.mark.parametrize("name", CASES)
def test_v1_checkpoint_loads_bit_identical(name):
    expected = load_file(FIXTURES / name / "expected_logits.safetensors")
    model = AutoModelForCausalLM.from_pretrained(FIXTURES / name).eval()
    with torch.no_grad():
        logits = model(expected["input_ids"]).logits
    assert torch.equal(logits, expected["logits"])
