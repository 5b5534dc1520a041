"""The plain-torch core: formats, codecs, packed layers and the layer op. No transformers here.

    errors          FormatError and its kinds: ConfigError, EncodingError, CheckpointError
    spec            TensorSpec and the value checks every format shares
    format          RBE format 1: code fields, stage/residual/layer specs, stored tensors, settings
    format_v2       RBE format 2: code planes (e8p, vq8, vq4, b1), stages, stored tensors, settings
    seed64_format   seed64: seed fields, stored tensors, settings
    bits            fixed-width codes packed into int32 bit streams
    rotation        randomized Hadamard rotation of the input side
    tables          format-1 basis tables, gain curves, the model-wide shared tables
    tables_v2       format-2 table fitting and the shipped universal tables
    codec           format-1 encode / decode (the PyTorch reference decoder)
    codec_v2        format-2 nearest codewords, encode / decode
    rbe_codecs      what RBELinear needs from each RBE format
    ldlq            output-aware encoding: LDLQ and Hessian-weighted scales
    seed64          seed64 generator and encoder
    op_layout       what the op's arguments mean: tensor order, layout ints
    reference       the op's PyTorch reference per format
    ops             the ``hf_rbe::linear`` custom op, the kernel registry
    packed          PackedLinear: the contract every packed layer keeps
    rbe_linear      RBELinear, shared-table owners and followers, swap_layers
    rbe_embedding   RBEEmbedding: a tied input embedding that decodes rows of its head's codes
    seed64_linear   Seed64Linear
    stored          embeddings and heads stored in half precision
    scale_tuning    training scales with the codes fixed
    qat             RBEQATLinear (straight-through), prepare_qat / reencode / freeze
    moved           old import paths that warn once (``calibrate``: now ``ldlq``)
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
