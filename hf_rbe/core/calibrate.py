"""Moved to ``hf_rbe.core.ldlq`` (the LDLQ maths); this path keeps working and warns once."""

from .moved import forward_to

__getattr__ = forward_to("hf_rbe.core.calibrate", "hf_rbe.core.ldlq")
