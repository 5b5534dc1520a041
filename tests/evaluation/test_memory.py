import sys
import time

import pytest
import torch

from hf_rbe.evaluation.memory import MemoryProfile
from hf_rbe.hf.calibration.phases import phase


@pytest.mark.parametrize("anonymous", [False, True])
def test_a_written_tensor_shows_in_the_peak_and_its_phase(anonymous):
    if anonymous and not sys.platform.startswith("linux"):
        pytest.skip("anonymous resident memory is read on Linux")
    with MemoryProfile(interval=0.001, anonymous=anonymous) as prof:
        with phase("fill"):
            t = torch.ones(64 * 2**20 // 4)  # 64 MiB, every page written
            time.sleep(0.02)
            del t
    assert prof.peak_mib - prof.base_mib >= 60
    assert prof.phases["fill"].peak_mib >= prof.base_mib + 60


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="anonymous resident memory is read on Linux")
def test_anonymous_memory_leaves_out_the_libraries_pages():
    with MemoryProfile() as rss, MemoryProfile(anonymous=True) as anon:
        pass
    assert anon.base_mib < rss.base_mib
