import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_rbe.core.bits import pack_codes, padding_is_clean, unpack_codes
from hf_rbe.core.format import FIELDS, MAX_WIDTH, CodeLayout, LayerSpec, ResidualSpec, StageSpec
from hf_rbe.core.spec import FormatError, TensorSpec, edit_stamp


def test_field_order_matches_paper():
    assert set(MAX_WIDTH) == set(FIELDS)
    lay = CodeLayout(amp_fine=2, cat=1, sub=1, idx=8, sign=1, deriv=1, amp=3)
    offs = lay.offsets
    # [amp_fine | cat | sub | idx | sign | deriv | amp], amp in the lowest bits
    assert offs == {"amp": 0, "deriv": 3, "sign": 4, "idx": 5, "sub": 13, "cat": 14, "amp_fine": 15}
    assert lay.width == 17
    assert FIELDS == ("amp_fine", "cat", "sub", "idx", "sign", "deriv", "amp")


@pytest.mark.parametrize("bad", [{"idx": 17}, {"idx": -1}, {"sign": 2}, {"amp": 1.5}, {"idx": True},
                                 {"idx": 0, "sign": 0, "amp": 0},
                                 {"idx": 16, "amp": 8, "amp_fine": 8, "sign": 1}])
def test_invalid_layouts_are_rejected(bad):
    with pytest.raises(FormatError):
        CodeLayout(**bad)


def test_invalid_specs_are_rejected():
    with pytest.raises(FormatError, match="even"):
        StageSpec(dim=3, layout=CodeLayout(deriv=1))
    with pytest.raises(FormatError, match="multiple of dim"):
        StageSpec(dim=4, group_size=6)
    with pytest.raises(FormatError):
        ResidualSpec(kind="int3")
    with pytest.raises(FormatError):
        ResidualSpec(kind="rbe")
    with pytest.raises(FormatError, match="power of two"):
        LayerSpec(rotation_block=48)
    with pytest.raises(FormatError, match="multiple of the vector dim"):
        LayerSpec(stage=StageSpec(dim=6)).check_shape(4, 100)


@settings(max_examples=60, deadline=None)
@given(width=st.integers(1, 32), n=st.integers(1, 70), rows=st.integers(1, 3), seed=st.integers(0, 2**31))
def test_pack_unpack_round_trip(width, n, rows, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2**width, (rows, n), generator=g, dtype=torch.int64)
    words = pack_codes(codes, width)
    assert words.dtype == torch.int32 and words.shape == (rows, -(-n * width // 32))
    assert torch.equal(unpack_codes(words, width, n), codes)
    assert padding_is_clean(words, width, n)


def test_padding_check_sees_stray_bits():
    codes = torch.ones(2, 3, dtype=torch.int64)
    words = pack_codes(codes, 5)  # 15 bits used of 32
    assert padding_is_clean(words, 5, 3)
    words[1, 0] |= 1 << 20
    assert not padding_is_clean(words, 5, 3)


def test_fields_round_trip():
    lay = CodeLayout(amp_fine=2, cat=1, sub=2, idx=9, sign=1, deriv=1, amp=3)
    g = torch.Generator().manual_seed(1)
    vals = {f: torch.randint(0, 2 ** getattr(lay, f), (50,), generator=g) for f in FIELDS}
    back = lay.unpack_fields(lay.pack_fields(**vals))
    for f in FIELDS:
        assert torch.equal(back[f], vals[f])


def test_every_stored_tensor_comes_from_the_spec():
    spec = LayerSpec(stage=StageSpec(dim=4, layout=CodeLayout(idx=9), group_size=32),
                     residual=ResidualSpec("int4", 32))
    t = spec.tensors(40, 96)
    assert t == {"weight": TensorSpec((40, 9), torch.int32),  # 24 codes x 12 bits = 288 bits = 9 words per row
                 "scale": TensorSpec((40, 3), torch.float16), "rotation_seed": TensorSpec((1,), torch.int64),
                 "residual_weight": TensorSpec((40, 12), torch.int32), "residual_scale": TensorSpec((40, 3), torch.float16)}
    assert spec.table_tensors() == {"table": TensorSpec((512, 4), torch.float32), "lut": TensorSpec((1, 4), torch.float32)}
    two = LayerSpec(residual=ResidualSpec("rbe", stage=StageSpec(dim=6, layout=CodeLayout(idx=7))))
    assert set(two.table_tensors()) == {"table", "lut", "residual_table", "residual_lut"}
    assert set(LayerSpec(rotation=False).tensors(4, 8)) == {"weight", "scale"}


@pytest.mark.parametrize("spec", [
    LayerSpec(),
    LayerSpec(stage=StageSpec(dim=6, layout=CodeLayout(idx=9, amp=3, deriv=1, cat=2, sub=1, amp_fine=2), group_size=12),
              residual=ResidualSpec("rbe", stage=StageSpec(dim=4, layout=CodeLayout(idx=7))), rotation_block=64, table_seed=9),
    LayerSpec(residual=ResidualSpec("fp8", 32), rotation=False),
])
def test_layout_ints_round_trip(spec):
    assert LayerSpec.from_layout(spec.to_layout()) == spec


def test_tensor_spec_checks_exactly():
    ts = TensorSpec((2, 3), torch.int32)
    ts.check("w", torch.zeros(2, 3, dtype=torch.int32))
    with pytest.raises(FormatError, match="is torch.float32, the format stores torch.int32"):
        ts.check("w", torch.zeros(2, 3))
    with pytest.raises(FormatError, match=r"shape \(3, 2\)"):
        ts.check("w", torch.zeros(3, 2, dtype=torch.int32))


def test_edit_stamp_sees_an_edit_and_takes_inference_tensors():
    t = torch.zeros(4)
    before = edit_stamp(t)
    t.add_(1)
    assert edit_stamp(t) != before
    with torch.inference_mode():
        u = torch.zeros(4)
    assert edit_stamp(u) == torch.Size([4])  # no version counter to read: no raise
