"""hf-rbe: Riemannian Basis Encoding quantization for Hugging Face Transformers.

``import hf_rbe`` makes RBE part of transformers: the ``"rbe"`` quantization method (so
``from_pretrained(..., quantization_config=RBEConfig())`` quantizes on load and a saved RBE
checkpoint loads with a plain ``from_pretrained``) and the Hb-BERT model type. It does so
without importing transformers itself: the registration runs as soon as transformers is
imported (at once if it already is), so ``import hf_rbe.core`` (plain torch) stays light.

Layers, lowest first; nothing imports a layer above its own (``tests/test_layering.py``)::

    core        formats, codecs, packed layers, the ``hf_rbe::linear`` op     (torch only)
    kernels     Triton and CPU implementations of the op                       (torch only)
    data        offline corpora and models, the fetch tool                     (datasets)
    hf          RBEConfig, calibration, replacement, the quantizer, cards      (transformers)
    training, hyperbolic, evaluation                                           (on top)
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import logging
import sys
from typing import Any

from .core import (
    FORMAT_VERSION,
    CheckpointError,
    ConfigError,
    EncodingError,
    FormatError,
    RBEEmbedding,
    RBELinear,
    Seed64Linear,
)
from .kernels import dispatch as _kernel_dispatch  # noqa: F401  (registers the kernels with the op)

__version__ = "0.2.0"

logger = logging.getLogger(__name__)

#: Public names that need transformers, imported on first use.
_LAZY = {"RBEConfig": "hf_rbe.hf.config", "PRESETS": "hf_rbe.hf.config", "RBEHfQuantizer": "hf_rbe.hf.quantizer",
         "quantize_model": "hf_rbe.hf.quantize", "replace_with_rbe_linear": "hf_rbe.hf.replace",
         "quantize_checkpoint": "hf_rbe.hf.checkpoint"}
#: What registers with transformers (each package registers itself when imported).
_REGISTRANTS = ("hf_rbe.hf", "hf_rbe.hyperbolic")

__all__ = ["FORMAT_VERSION", "CheckpointError", "ConfigError", "EncodingError", "FormatError", "RBEEmbedding",
           "RBELinear", "Seed64Linear", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hf_rbe' has no attribute {name!r}")


def _register() -> None:
    """Import the packages that register with transformers. A package already being imported
    (the import of transformers was triggered from inside it) registers itself when it ends."""
    for name in _REGISTRANTS:
        try:
            importlib.import_module(name)
        except Exception:  # never break `import transformers` for the user; say what is missing
            logger.exception("hf-rbe could not register %s with transformers; RBE checkpoints will not load", name)


class _AfterTransformers(importlib.abc.MetaPathFinder):
    """Runs :func:`_register` right after the ``transformers`` package finishes importing."""

    def find_spec(self, fullname, path, target=None):  # type: ignore[no-untyped-def]
        if fullname != "transformers":
            return None
        sys.meta_path.remove(self)  # find the real spec without us, once
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module) -> None:  # type: ignore[no-untyped-def]
            exec_module(module)
            _register()

        spec.loader.exec_module = exec_then_register  # type: ignore[method-assign]
        return spec


if "transformers" in sys.modules:
    _register()
elif not any(isinstance(f, _AfterTransformers) for f in sys.meta_path):
    sys.meta_path.insert(0, _AfterTransformers())
