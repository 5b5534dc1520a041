"""Format v2: exact nearest codewords, plane packing, the shipped tables, and quality against v1."""

import pytest
import torch
from conftest import rel_mse
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_rbe.core import codec as v1
from hf_rbe.core import codec_v2 as C
from hf_rbe.core import tables_v2 as T
from hf_rbe.core.format_v2 import PLANES, LayerSpecV2, StageV2
from hf_rbe.core.rbe_codecs import universal_tables
from hf_rbe.core.spec import FormatError, TensorSpec
from hf_rbe.core.tables import tables_for
from hf_rbe.hf.config import RBEConfig


def _all_e8p_codewords(table: torch.Tensor) -> torch.Tensor:
    bits = (torch.arange(128)[:, None] >> torch.arange(7)) & 1
    sign = 1 - 2 * torch.cat([bits, bits.sum(1, keepdim=True) % 2], 1).float()
    return (table[:, None, :] * sign[None]).reshape(-1, 8)  # [512 * 128, 8]: every 16-bit code


def test_e8p_nearest_is_exact_and_decodes_to_what_it_found():
    table = universal_tables(LayerSpecV2())["table"]
    u = torch.randn(300, 8, generator=torch.Generator().manual_seed(1)) * 1.3
    codes, values = C.nearest(u, "e8p", table)
    every = _all_e8p_codewords(table)
    best = torch.cdist(u.double(), every.double()).min(1).values ** 2
    assert torch.allclose(((u - values) ** 2).sum(1).double(), best, rtol=1e-5, atol=1e-6)
    assert torch.equal(C.codewords(codes, "e8p", table), values)
    assert int(codes.max()) < 2**16


def test_e8p_codewords_have_the_parity_of_their_entry():
    table = universal_tables(LayerSpecV2())["table"]
    codes = torch.randint(0, 2**16, (500,))
    v = C.codewords(codes, "e8p", table)
    mag, parity = C.e8p_parts(table)
    idx = codes & 511
    assert torch.equal(v.abs(), mag[idx])
    assert torch.equal((v < 0).sum(1) % 2, parity[idx])


@settings(max_examples=40, deadline=None)
@given(plane=st.sampled_from(sorted(PLANES)), rows=st.integers(1, 4), vecs=st.integers(1, 12), seed=st.integers(0, 99))
def test_planes_pack_and_unpack_exactly(plane, rows, vecs, seed):
    vecs += vecs % 2 if PLANES[plane].codes_per_byte == 2 else 0
    codes = torch.randint(0, 2 ** PLANES[plane].bits, (rows, vecs), generator=torch.Generator().manual_seed(seed))
    stored = C.pack_plane(codes, plane)
    spec = StageV2(plane).tensors(rows, vecs * 8, "")["weight"]
    spec.check("weight", stored)
    assert torch.equal(C.unpack_plane(stored, plane), codes)


def test_every_stored_tensor_comes_from_the_spec():
    spec = LayerSpecV2((StageV2("e8p"), StageV2("vq4", group_size=64), StageV2("vq8")))
    t = spec.tensors(10, 128)
    assert t["weight"] == TensorSpec((10, 16), torch.int16)
    assert t["residual_weight"] == TensorSpec((10, 8), torch.uint8) and t["residual_scale"].shape == (10, 2)
    assert t["residual2_weight"] == TensorSpec((10, 16), torch.uint8)
    assert spec.table_tensors()["residual_table"] == TensorSpec((16, 8), torch.float32)
    assert LayerSpecV2.from_layout(spec.to_layout()) == spec
    with pytest.raises(FormatError, match="first v2 stage must be one of"):
        LayerSpecV2((StageV2("vq8"),))
    with pytest.raises(FormatError, match="multiple of 16"):
        spec.check_shape(4, 24)


def test_shipped_tables_keep_the_e8p_structure():
    for key, table in T._shipped().items():
        plane = key.split("/")[0]
        assert table.shape == (PLANES[plane].table_size, 8) and torch.isfinite(table).all()
        if plane == "e8p":
            assert (table[:, :7] >= 0).all() and (table[:, 7] != 0).all()


def _gauss(rows: int = 256, cols: int = 1024, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("preset", ["v2-2", "v2-2.5", "v2-3", "v2-4"])
def test_encode_decode_round_trip_and_error_falls_with_bits(preset):
    spec = RBEConfig.from_preset(preset, rotation=False).base_spec()
    w, tables = _gauss(), universal_tables(spec)
    stored = C.encode_layer(w, spec, tables)
    for name, ts in spec.tensors(*w.shape).items():
        if name != "rotation_seed":
            ts.check(name, stored[name])
    err = rel_mse(C.decode_layer({**stored, **tables}, spec, w.shape[1]), w)
    limit = {"v2-2": 0.092, "v2-2.5": 0.056, "v2-3": 0.031, "v2-4": 0.0090}[preset]
    assert err <= limit, (preset, err)


def test_a_sign_plane_run_is_the_best_uniform_grid():
    """The first scale of a run of b1 stages is the top of the uniform quantizer with the least
    squared error on a unit Gaussian: Max (1960) tabulates its step as 1.596 / 0.9957 / 0.5860 /
    0.3352 for 2 / 4 / 8 / 16 levels, and the run's levels span 2**planes - 1 steps."""
    for planes, step in [(1, 1.596), (2, 0.9957), (3, 0.5860), (4, 0.3352)]:
        assert C.ladder_top(planes) == pytest.approx(step * ((1 << planes) - 1) / 2 / (2 - 2.0 ** (1 - planes)), abs=2e-3)
    spec = LayerSpecV2(tuple(StageV2("b1") for _ in range(3)), rotation=False)
    w = _gauss()
    stored = C.encode_layer(w, spec, universal_tables(spec))
    signs = [C.unpack_plane(stored[p + "weight"], "b1") for p in ("", "residual_", "residual2_")]
    level = sum((1 - 2 * ((c[..., None] >> torch.arange(8)) & 1)) * 2 ** (2 - i) for i, c in enumerate(signs))
    assert sorted(level.unique().tolist()) == [-7, -5, -3, -1, 1, 3, 5, 7]  # each weight one of 8 grid levels
    grid = (w * 4 / (C.ladder_top(3) * w.pow(2).mean(1, keepdim=True).sqrt())).reshape(level.shape)  # in quarters of the top
    nearest = (((grid + 7) / 2).round().clamp(0, 7) * 2 - 7)
    assert (nearest == level).float().mean() > 0.999  # the nearest level (but for ties lost to fp16 scales)


@pytest.mark.parametrize("preset, uniform", [("v2-b2", 0.1188), ("v2-b3", 0.03744), ("v2-b4", 0.01154)])
def test_sign_plane_presets_reach_the_uniform_quantizer(preset, uniform):
    """Max's least squared error of a uniform quantizer on a unit Gaussian is 0.1188 / 0.03744 /
    0.01154 at 4 / 8 / 16 levels: a run of sign stages reaches it (3% for finite rows), and the
    refit of its scales per row may improve on it only a little (the grid stays a ladder)."""
    spec = RBEConfig.from_preset(preset, rotation=False).base_spec()
    w, tables = _gauss(), universal_tables(spec)
    err = rel_mse(C.decode_layer({**C.encode_layer(w, spec, tables), **tables}, spec, w.shape[1]), w)
    assert 0.9 * uniform < err <= 1.03 * uniform, (preset, err)


@pytest.mark.parametrize("v2,v1_preset", [("v2-2", "rbe-2"), ("v2-3", "rbe-3"), ("v2-4", "rbe-4")])
def test_v2_beats_v1_at_equal_bits_on_gaussian_weights(v2, v1_preset):
    w = _gauss(192, 768, seed=3)  # 768 = 8 x 96 = 6 x 128: every layout's vector dim divides it
    s2 = RBEConfig.from_preset(v2, rotation=False).base_spec()
    t2 = universal_tables(s2)
    e2 = rel_mse(C.decode_layer({**C.encode_layer(w, s2, t2), **t2}, s2, 768), w)
    s1 = RBEConfig.from_preset(v1_preset, rotation=False).base_spec()
    t1 = tables_for(s1)
    e1 = rel_mse(v1.decode_layer(v1.encode_layer(w, s1, t1), s1, t1, 768), w)
    # v2 stores a scale per stage: on this 768-wide layer up to 16 / 768 = 0.021 bit more
    assert s2.bits_per_weight_estimate(768) <= s1.bits_per_weight_estimate(768) + 0.021
    assert e2 < e1, (e2, e1)


def test_fitting_lowers_the_error_and_is_deterministic():
    x = torch.randn(4096, 8, generator=torch.Generator().manual_seed(5))
    a, b = T.fit_e8p(x, 3, seed=1), T.fit_e8p(x, 3, seed=1)
    assert torch.equal(a, b)
    err = lambda t: float(((C.nearest(x, "e8p", t)[1] - x) ** 2).mean())  # noqa: E731
    assert err(T.fit_e8p(x, 6, seed=1, init=a)) <= err(a) + 1e-6
    assert err(a) < err(T.fit_e8p(x, 0, seed=1))  # k-means beats its random start
