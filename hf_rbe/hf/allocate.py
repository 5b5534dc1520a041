"""Moved to ``hf_rbe.hf.calibration.allocate``; this path keeps working and warns once."""

from ..core.format_v2 import PLANE_LADDER as LADDER  # noqa: F401  (its old name here)
from ..core.moved import forward_to

__getattr__ = forward_to("hf_rbe.hf.allocate", "hf_rbe.hf.calibration.allocate")
