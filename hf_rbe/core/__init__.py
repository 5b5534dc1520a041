"""The plain-torch core: formats, codecs, packed layers and the layer op. No transformers here.

    spec            FormatError, TensorSpec: what every format shares
    format          RBE v1: code fields, stage/residual/layer specs, stored tensors
    seed64_format   seed64: seed fields, stored tensors
    bits            fixed-width codes packed into int32 bit streams
    rotation        randomized Hadamard rotation of the input side
    tables          v1 basis tables, gain curves, the model-wide shared tables
    codec           v1 encode / decode (the PyTorch reference decoder)
    seed64          seed64 generator and encoder
    ops             the ``hf_rbe::linear`` custom op and its reference
    packed          PackedLinear: the contract every packed layer keeps
    rbe_linear      RBELinear (v1) and the linking of shared tables
    seed64_linear   Seed64Linear
"""

from .format import FORMAT_VERSION, CodeLayout, LayerSpec, ResidualSpec, StageSpec
from .packed import PackedLinear
from .rbe_linear import RBELinear, link_shared_tables
from .seed64_format import Seed64Spec
from .seed64_linear import Seed64Linear
from .spec import FormatError, TensorSpec

__all__ = ["FORMAT_VERSION", "CodeLayout", "FormatError", "LayerSpec", "PackedLinear", "RBELinear", "ResidualSpec",
           "Seed64Linear", "Seed64Spec", "StageSpec", "TensorSpec", "link_shared_tables"]
