"""Row-gather decoding: a lookup decodes the rows of the full decoded matrix it asks for (equal up to
the float rounding of the unrotation's matmul, which BLAS blocks differently for fewer rows)."""

import pytest
import torch

from hf_rbe import RBEConfig
from hf_rbe.core.rbe_codecs import codec_for
from hf_rbe.core.rbe_embedding import RBEEmbedding, decode_rows
from hf_rbe.core.rbe_linear import RBELinear


@pytest.mark.parametrize("preset", ["v2-2", "v2-2.5", "v2-3", "v2-6", "rbe-3", "rbe-4.5", "rbe-5.5"])
@pytest.mark.parametrize("table", ["universal", "per_layer"])
def test_gathered_rows_equal_the_decoded_matrix_bit_for_bit(preset, table):
    torch.manual_seed(0)
    spec = RBEConfig.from_preset(preset, table=table).base_spec()
    tables = codec_for(spec).universal_tables(spec) if table == "universal" else None
    layer = RBELinear.from_linear(torch.nn.Linear(128, 40), spec, tables, rotation_seed=7)
    rows = torch.tensor([3, 0, 39, 3, 17])
    full = layer.dequantize(torch.float32)
    same = dict(rtol=0, atol=1e-6 * float(full.abs().max()))
    torch.testing.assert_close(decode_rows(layer, rows), full[rows], **same)
    emb = RBEEmbedding(layer)
    out = emb(torch.tensor([[3, 0], [39, 3]]))
    assert out.shape == (2, 2, 128)
    torch.testing.assert_close(out.reshape(4, 128), full[[3, 0, 39, 3]], **same)


def test_lookups_follow_the_heads_dtype_and_store_nothing():
    spec = RBEConfig.from_preset("v2-3").base_spec()
    layer = RBELinear.from_linear(torch.nn.Linear(64, 16), spec, codec_for(spec).universal_tables(spec))
    emb = RBEEmbedding(layer, padding_idx=0)
    assert dict(emb.state_dict()) == {} and list(emb.children()) == [] and emb.weight is layer.weight
    layer.to(torch.bfloat16)
    assert emb(torch.tensor([1, 2])).dtype == torch.bfloat16
