import json
import subprocess
import sys

import pytest

from hf_rbe.evaluation.memory import MemoryProfile

# Run in a fresh process: in a long test session the allocator may hand back pages an earlier test
# freed but kept resident, and a new tensor then adds nothing to RSS.
_FILL = """
import json, sys, time
import torch
from hf_rbe.evaluation.memory import MemoryProfile
from hf_rbe.hf.calibration.phases import phase
with MemoryProfile(interval=0.001, anonymous=sys.argv[1] == "1") as prof:
    with phase("fill"):
        t = torch.ones(64 * 2**20 // 4)  # 64 MiB, every page written
        time.sleep(0.05)
        del t
print(json.dumps({"base": prof.base_mib, "peak": prof.peak_mib, "fill": prof.phases["fill"].peak_mib}))
"""


@pytest.mark.parametrize("anonymous", [False, True])
def test_a_written_tensor_shows_in_the_peak_and_its_phase(anonymous):
    if anonymous and not sys.platform.startswith("linux"):
        pytest.skip("anonymous resident memory is read on Linux")
    out = subprocess.run([sys.executable, "-c", _FILL, str(int(anonymous))], capture_output=True, text=True,
                         check=True, timeout=300)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["peak"] - got["base"] >= 60
    assert got["fill"] >= got["base"] + 60


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="anonymous resident memory is read on Linux")
def test_anonymous_memory_leaves_out_the_libraries_pages():
    with MemoryProfile() as rss, MemoryProfile(anonymous=True) as anon:
        pass
    assert anon.base_mib < rss.base_mib
