"""What the arguments of ``hf_rbe::linear`` mean: the one place layers, the reference and kernels read them from.

Every packed layer calls the op with ``(x, tensors, layout, bias)``. ``layout`` is a list of ints,
``[format_id, out_features, in_features, *spec ints]`` (each format's ``to_layout``), and
``tensors`` lists the layer's tensors in the order :func:`op_tensor_names` gives for its spec:

    RBE v1 / v2   its stored per-layer tensors in ``spec.tensors`` order (the rotation seed aside),
                  then ``signs`` (fp32 [in_features] of +-1, derived from the seed; with rotation),
                  then its tables in ``spec.table_tensors`` order
    seed64        its stored tensors in ``spec.tensors`` order (the residual is a layer of its own)

Kernels never import the layer modules; they read names, specs and sign tables from here and
from the format modules.
"""

from __future__ import annotations

import functools

from .rbe_codecs import RBECodec, Spec, codec_by_id

#: The Hadamard signs: derived from ``rotation_seed``, passed to the op, never saved.
SIGNS = "signs"


def format_id(layout: list[int]) -> int:
    return layout[0]


def out_features(layout: list[int]) -> int:
    return layout[1]


def in_features(layout: list[int]) -> int:
    return layout[2]


@functools.lru_cache(maxsize=256)
def op_tensor_names(spec: Spec) -> tuple[str, ...]:
    """The tensors of ``hf_rbe::linear`` for an RBE layer, in order (module docstring; cached:
    every forward asks for it)."""
    names = [n for n in spec.tensors(0, 0) if n != "rotation_seed"]
    return tuple(names + ([SIGNS] if spec.rotation else []) + list(spec.table_tensors()))


@functools.lru_cache(maxsize=256)
def parse_rbe(layout: tuple[int, ...]) -> tuple[RBECodec, Spec, int, tuple[str, ...]]:
    """(codec, spec, in_features, op tensor names) of an RBE layout (v1 or v2)."""
    codec = codec_by_id(layout[0])
    spec = codec.spec_type.from_layout(list(layout[3:]))
    return codec, spec, layout[2], op_tensor_names(spec)
