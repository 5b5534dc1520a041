"""Tensor-parallel shards of RBE layers: each rank's part, computed alone, combines to the whole
layer's output (outputs side by side for a column split, summed for a row split), and splits
that would cut a rotation block, a code vector or a scale group are refused."""

import functools

import pytest
import torch

from hf_rbe.core import ops
from hf_rbe.core.errors import ConfigError
from hf_rbe.core.format import LayerSpec
from hf_rbe.core.format_v2 import LayerSpecV2, StageV2
from hf_rbe.core.rbe_codecs import universal_tables
from hf_rbe.core.rbe_linear import RBELinear
from hf_rbe.serving.sharding import COLUMN, ROW, shard_layout, shard_signs, shard_tensor

SPECS = {
    "v2-2 per row": LayerSpecV2((StageV2("e8p"),)),
    "v2-2.5 groups of 64": LayerSpecV2((StageV2("e8p", 64), StageV2("vq4", 64))),
    "v2-3 block 64": LayerSpecV2((StageV2("e8p"), StageV2("vq8")), rotation_block=64),
    "v2-6 no rotation": LayerSpecV2((StageV2("e8p", 32), StageV2("e8p", 32), StageV2("e8p", 32)), rotation=False),
}


@functools.cache  # each layer is encoded once for all the splits tested on it
def _layer(spec, out_f=96, in_f=1024, seed=3):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(in_f, out_f, bias=False)
    return RBELinear.from_linear(lin, spec, universal_tables(spec), rotation_seed=1234)


def _rank_output(layer, x, kind, rank, world):
    layout = layer.layout()
    stored = {n: getattr(layer, n) for n in layer.stored_tensors()}
    local = shard_layout(layout, kind, rank, world)
    named = {n: shard_tensor(n, t, layout, kind, rank, world) for n, t in stored.items()}
    if layer.spec.rotation:
        named["signs"] = shard_signs(int(layer.rotation_seed.item()), layout, kind, rank, world)
    if kind == ROW:
        n = layout[2] // world
        x = x[..., rank * n:(rank + 1) * n]
    return ops.reference_linear(x, [named[n] for n in layer.op_tensor_names()], local, None)


@pytest.mark.parametrize("name", sorted(SPECS))
@pytest.mark.parametrize("kind", [COLUMN, ROW])
@pytest.mark.parametrize("world", [2, 4])
def test_the_ranks_together_give_the_whole_layer(name, kind, world):
    layer = _layer(SPECS[name])
    x = torch.randn(5, layer.in_features)
    whole = layer(x)
    parts = [_rank_output(layer, x, kind, r, world) for r in range(world)]
    combined = torch.cat(parts, -1) if kind == COLUMN else torch.stack(parts).sum(0)
    torch.testing.assert_close(combined, whole, rtol=1e-5, atol=1e-5)


def test_a_row_split_that_cuts_a_rotation_block_is_refused():
    layout = _layer(SPECS["v2-2 per row"], in_f=256).layout()  # one 256-wide rotation block
    with pytest.raises(ConfigError, match="cuts the 256-wide rotation blocks"):
        shard_layout(layout, ROW, 0, 2, "o_proj")
    assert shard_layout(layout, COLUMN, 1, 2)[1:3] == [48, 256]


def test_a_row_split_that_cuts_scale_groups_or_code_vectors_is_refused():
    grouped = _layer(LayerSpecV2((StageV2("e8p", 128),), rotation=False), in_f=256).layout()
    with pytest.raises(ConfigError, match="scale groups of 128"):
        shard_layout(grouped, ROW, 0, 4)
    nibbles = _layer(LayerSpecV2((StageV2("e8p"), StageV2("vq4")), rotation=False), in_f=48).layout()
    with pytest.raises(ConfigError, match="16-weight code vectors of its 'vq4' plane"):
        shard_layout(nibbles, ROW, 0, 2)  # 24 inputs per rank: not whole 16-weight nibble pairs
    with pytest.raises(ConfigError, match="do not split over 5 ranks"):
        shard_layout(grouped, COLUMN, 0, 5)


def test_format_v1_is_served_on_one_rank_only():
    layout = _layer(LayerSpec()).layout()
    assert shard_layout(layout, COLUMN, 0, 1) == layout
    with pytest.raises(ConfigError, match="served on one rank only"):
        shard_layout(layout, COLUMN, 0, 2)
