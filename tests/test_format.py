import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hf_rbe.format import (
    FIELDS, CodeLayout, FormatError, LayerSpec, ResidualSpec, StageSpec, pack_codes, padding_is_clean, unpack_codes,
)


def test_field_order_matches_paper():
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
