"""Shared tables: one layer stores them, the others follow it; no layer ever decodes with tables
that are not the owner's (zeros, stale values, uninitialised memory)."""

import pytest
import torch
from torch import nn

from hf_rbe import RBEConfig, RBELinear
from hf_rbe.core.errors import CheckpointError
from hf_rbe.core.rbe_codecs import codec_for, universal_tables
from hf_rbe.core.rbe_linear import link_shared_tables, swap_layers


def _pair(preset: str = "v2-3", device: str = "cpu") -> tuple[RBELinear, RBELinear]:
    spec = RBEConfig.from_preset(preset).base_spec()
    key = codec_for(spec).table_key(spec)
    owner = RBELinear(64, 16, True, spec, table_key=key, owns_table=True, device=device)
    follower = RBELinear(64, 24, True, spec, table_key=key, owns_table=False, device=device, table_owner=owner)
    return owner, follower


@pytest.mark.parametrize("preset", ["v2-3", "rbe-3"])
def test_fresh_layers_hold_the_universal_tables_never_zeros(preset):
    owner, follower = _pair(preset)
    expected = universal_tables(owner.spec)
    for layer in (owner, follower):
        for name, t in layer.tables().items():
            assert torch.equal(t, expected[name]), name


def test_a_follower_reads_what_its_owner_is_given():
    owner, follower = _pair()
    trained = {n: t * 1.5 for n, t in owner.tables().items()}  # as a QAT run with trained tables leaves them
    owner.load_packed({**owner.encode(torch.randn(16, 64), tables=trained)})
    follower.load_packed(follower.encode(torch.randn(24, 64), tables=trained))
    for name, t in follower.tables().items():
        assert torch.equal(t, getattr(owner, name)), name


class _Both(nn.ModuleList):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([m(x) for m in self], -1)


def test_load_state_dict_into_an_empty_model_refills_the_followers():
    # to("meta") -> to_empty() -> load_state_dict(): a follower's tables are not in the state dict
    model = _Both(_pair())
    for layer, n in zip(model, (16, 24)):
        layer.load_packed(layer.encode(torch.randn(n, 64)))
    x = torch.randn(3, 64)
    with torch.no_grad():
        expected = model(x)
    state = model.state_dict()
    assert not any(k.startswith("1.") and k.endswith("table") for k in state)  # stored once
    empty = model.to("meta").to_empty(device="cpu")
    empty.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(empty(x), expected)


def test_swap_layers_links_followers_to_the_layer_that_stores_the_tables():
    owner, follower = _pair()
    orphan = RBELinear(64, 24, True, follower.spec, table_key=follower.table_key, owns_table=False)
    assert orphan.table_owner is None
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 24))
    swap_layers(model, {"0": owner, "1": orphan})
    assert orphan.table_owner is owner
    with pytest.raises(CheckpointError, match="no layer stores the shared table"):
        link_shared_tables(nn.Sequential(orphan))
    with pytest.raises(CheckpointError, match="cannot follow"):
        orphan.follow(_pair("v2-4")[0])


def test_load_state_dict_refills_a_follower_that_loads_before_its_owner():
    owner, follower = _pair()
    model = _Both([follower, owner])  # the follower comes first in module order
    for layer, n in ((owner, 16), (follower, 24)):
        layer.load_packed(layer.encode(torch.randn(n, 64), tables={k: t * 1.5 for k, t in owner.tables().items()}))
    link_shared_tables(model)  # as every conversion ends (hf.finish)
    x = torch.randn(3, 64)
    with torch.no_grad():
        expected = model(x)
    state = model.state_dict()
    empty = model.to("meta").to_empty(device="cpu")
    empty.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(empty(x), expected)
