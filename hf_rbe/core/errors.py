"""The exceptions hf-rbe raises when it refuses something: one type per kind of problem.

All four are ``ValueError`` subclasses, and the three kinds share the base ``FormatError``, so
``except FormatError`` (or ``except ValueError``) still catches everything hf-rbe refuses.

    ConfigError      settings that cannot be built (an RBEConfig argument, a format field, a CLI
                     --config, calibration settings or data that cannot be used)
    EncodingError    a weight the format cannot encode: NaN/Inf, scales fp16 cannot hold, a shape
                     the format cannot store (quantizing keeps such a layer in full precision
                     when the shape is the reason, with a warning)
    CheckpointError  stored tensors or a checkpoint that do not match their format: missing,
                     mistyped, out-of-range or tampered tensors, a config.json that no longer
                     describes the weights
"""

from __future__ import annotations


class FormatError(ValueError):
    """Base class of everything hf-rbe refuses (see the module docstring for the three kinds)."""


class ConfigError(FormatError):
    """Settings that cannot be built: an invalid argument, field width, preset or calibration input."""


class EncodingError(FormatError):
    """A weight the format cannot encode (values or shape)."""


class CheckpointError(FormatError):
    """Stored tensors or a checkpoint that do not match their format (corrupt, truncated, tampered, edited)."""
