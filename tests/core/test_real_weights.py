"""RBE on real weights: the all-MiniLM-L6-v2 layers against the scalar baseline and the Shannon bound."""

import math

import torch

from hf_rbe import RBEConfig, RBELinear
from hf_rbe.core.rbe_codecs import universal_tables
from hf_rbe.evaluation.baselines import minmax_quantize


def test_rbe_beats_scalar_on_real_minilm_layers(minilm_path):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(minilm_path)
    layers = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("encoder.layer.5.")]
    assert len(layers) == 6
    spec = RBEConfig.from_preset("rbe-2.5").base_spec()
    tables = universal_tables(spec)
    err = scalar_err = energy = bits = n = 0.0
    for k, lin in enumerate(layers):
        w = lin.weight.detach()
        q = RBELinear.from_linear(lin, spec, tables, rotation_seed=k)
        err += float((q.dequantize() - w).double().pow(2).sum())
        scalar_err += float((minmax_quantize(w, 2, 32) - w).double().pow(2).sum())  # 3.0 bits per weight
        energy += float(w.double().pow(2).sum())
        bits += q.storage_bits(include_tables=False)
        n += w.numel()
    bpw, rel = bits / n, err / energy
    assert bpw < 2.6
    assert rel < 0.5 * scalar_err / energy  # half the error of scalar at more bits
    assert 10 * math.log10(rel / 2 ** (-2 * bpw)) < 3.0  # within 3 dB of the Shannon bound
