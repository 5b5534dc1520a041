"""bench/int8_simd.py: the int8 (VNNI) form of the v2 GEMV agrees with the product kernel to its
tolerance, and a wrong sign table is caught."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import cpu_kernel_variants as variants  # noqa: E402  (bench/, put on the path above)
import int8_simd  # noqa: E402

from hf_rbe.kernels import cpu_numba as cn  # noqa: E402

pytestmark = pytest.mark.skipif(not int8_simd.available(), reason="needs AVX-512 VNNI and VBMI")


@pytest.mark.parametrize(("stages", "k", "n"), [(1, 576, 40), (2, 576, 41), (2, 1024, 16)])
def test_int8_form_matches_product_kernel(stages, k, n):
    layer = variants._views(variants._layer(n, k, seed=stages + k), k)
    ref = np.zeros((1, n), np.float32)
    variants._call("product", stages, layer, k, ref)
    got = np.zeros((1, n), np.float32)
    int8_simd.gemv(layer, k, stages, int8_simd.sign_bytes(cn._SIGNS.reshape(128, 8)), got)
    err = np.abs(got - ref).max() / np.abs(ref).max()
    assert err < variants.INT8_TOLERANCE
    # the e8p signs matter: without them the same check fails
    wrong = np.zeros((1, n), np.float32)
    int8_simd.gemv(layer, k, stages, np.zeros(128, np.uint8), wrong)
    assert np.abs(wrong - ref).max() / np.abs(ref).max() > variants.INT8_TOLERANCE


def test_sign_bytes_follow_the_sign_table():
    b = int8_simd.sign_bytes(cn._SIGNS.reshape(128, 8))
    assert b[0] == 0 and b[1] == 0b1000_0001 and b[3] == 0b0000_0011  # parity sets bit 7 on odd counts
