"""Checkpoints saved by older hf-rbe (tests/fixtures: format v1, and format v2 before the house
restructure, whose configs hold every format-1 default) keep loading.

What "the same model" means across machines: the stored tensors load bit for bit, the loaded
model reproduces the logits recorded when the fixture was written to within float32 rounding,
and a save and fresh reload on this machine is bit-identical. The recorded logits were computed
on another CPU: torch's GEMMs pick kernels by CPU (AVX2, AVX-512, AMX), which round sums in
another order, so recorded and recomputed logits can differ in the last bits (measured: up to
3e-7 of the largest logit between an AMD EPYC and an Intel Xeon); a wrong table, code or scale
moves them by orders of magnitude more. A head stored in bf16 multiplies in bf16 (its fp32 input
rounded to bf16), so there the same products summed in another order anywhere before it move the
logits by bf16 rounding, not float32's: the few-row GEMV, which sums an e8p stage and the next per
weight vector where each stage had its own pass, moved v2_preset_overrides' 8-token logits by
2.1e-3 of the largest (one bf16 step of a logit); the bound for such a head is one bf16 epsilon of
the largest logit, which dropping every layer's last stage exceeds fifty-fold (and the stored
tensors themselves are compared bit for bit).
"""

from pathlib import Path

import pytest
import torch
from conftest import assert_fresh_reload_identical
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import hf_rbe  # noqa: F401  (registers the quantizer)
from hf_rbe.core.packed import PackedLinear

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
CASES = sorted(p.name for p in FIXTURES.iterdir() if p.is_dir())
#: Rounding across CPUs and summation orders, relative to the largest logit, by the dtype the head
#: multiplies in (module docstring).
ACROSS_CPUS = {torch.float32: 1e-5, torch.bfloat16: torch.finfo(torch.bfloat16).eps}


def _head_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype the output head multiplies in: a float head's weight dtype (a stored head keeps
    its own), else the activations' (a coded head's weight holds codes; these models compute in fp32)."""
    weight = model.get_output_embeddings().weight
    return weight.dtype if weight.is_floating_point() else torch.float32


def test_every_fixture_is_found():
    assert CASES == ["v1_rbe_default", "v1_rbe_gpt2_fp8", "v1_rbe_per_layer_int4", "v1_seed64_rbe",
                     "v2_preset_overrides", "v2_tied_coded_head"]


@pytest.mark.parametrize("name", CASES)
def test_old_checkpoint_loads_the_same_model(name, tmp_path):
    expected = load_file(FIXTURES / name / "expected_logits.safetensors")
    stored = load_file(FIXTURES / name / "model.safetensors")
    model = AutoModelForCausalLM.from_pretrained(FIXTURES / name).eval()
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, PackedLinear)]
    assert layers
    for n, m in layers:
        for t in m.stored_tensors():
            if f"{n}.{t}" in stored:  # a layer that links to a shared table does not store it
                assert torch.equal(getattr(m, t), stored[f"{n}.{t}"]), f"{n}.{t}"
    with torch.no_grad():
        logits = model(expected["input_ids"]).logits
    top = expected["logits"].abs().max()
    assert (logits - expected["logits"]).abs().max() <= ACROSS_CPUS[_head_dtype(model)] * top
    model.save_pretrained(tmp_path / "again")
    assert_fresh_reload_identical(tmp_path / "again", expected["input_ids"], logits)
