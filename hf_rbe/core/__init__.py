"""The plain-torch core: formats, codecs, packed layers and the layer op. No transformers here.

    errors          FormatError and its kinds: ConfigError, EncodingError, CheckpointError
    spec            TensorSpec and the value checks every format shares
    format          RBE v1: code fields, stage/residual/layer specs, stored tensors
    format_v2       RBE v2: code planes (e8p, vq8, vq4), stages, stored tensors
    seed64_format   seed64: seed fields, stored tensors
    bits            fixed-width codes packed into int32 bit streams
    rotation        randomized Hadamard rotation of the input side
    tables          v1 basis tables, gain curves, the model-wide shared tables
    codec           v1 encode / decode (the PyTorch reference decoder)
    codec_v2        v2 nearest codewords, encode / decode
    tables_v2       v2 table fitting and the shipped universal tables
    rbe_codecs      what RBELinear needs from each RBE format
    seed64          seed64 generator and encoder
    ops             the ``hf_rbe::linear`` custom op and its reference
    packed          PackedLinear: the contract every packed layer keeps
    rbe_linear      RBELinear (v1) and the linking of shared tables
    rbe_embedding   RBEEmbedding: a tied input embedding that decodes rows of its head's codes
    seed64_linear   Seed64Linear
"""

from .errors import CheckpointError, ConfigError, EncodingError, FormatError
from .format import CodeLayout, LayerSpec, ResidualSpec, StageSpec
from .format_v2 import FORMAT_VERSION, LayerSpecV2, StageV2
from .packed import PackedLinear
from .rbe_codecs import universal_tables
from .rbe_embedding import RBEEmbedding
from .rbe_linear import RBELinear, link_shared_tables
from .seed64_format import Seed64Spec
from .seed64_linear import Seed64Linear
from .spec import TensorSpec

__all__ = ["FORMAT_VERSION", "CheckpointError", "CodeLayout", "ConfigError", "EncodingError", "FormatError",
           "LayerSpec", "LayerSpecV2", "PackedLinear", "RBEEmbedding",
           "RBELinear", "ResidualSpec", "Seed64Linear", "Seed64Spec", "StageSpec", "StageV2", "TensorSpec",
           "link_shared_tables", "universal_tables"]
