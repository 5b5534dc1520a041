"""``RBEEmbedding``: an input embedding that reads the RBE codes of the output head it is tied to.

Most small language models (SmolLM2, GPT-2, Llama-3.2 1B) use one matrix as input embedding
and output head; in SmolLM2-135M it is a fifth of the weights. Coded as the head
(``RBELinear`` [vocab, hidden], rotated on the hidden side), it is stored once: looking up token
``t`` decodes row ``t`` alone (gather the per-row codes and scales of the tokens asked for,
decode those rows, undo the rotation ``W_rot = W S H`` row by row), so a decoding step costs
one row, not the matrix.

The embedding holds the head as a plain attribute, not a submodule: the state dict names every
tensor once (under the head), ``.to()`` moves it once, and ``copy.deepcopy`` / pickling keep
the link (their memo maps it to the copied head).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from .rbe_codecs import Spec
from .rbe_linear import SIGNS, RBELinear
from .rotation import unrotate


@functools.lru_cache(maxsize=64)
def _row_tensors(spec: Spec, in_features: int) -> frozenset[str]:
    """Stored tensors with one entry per output row (codes, scales): those a lookup gathers."""
    one, two = spec.tensors(1, in_features), spec.tensors(2, in_features)
    return frozenset(n for n in one if one[n].shape != two[n].shape)


def decode_rows(layer: RBELinear, rows: torch.Tensor) -> torch.Tensor:
    """fp32 [len(rows), in_features]: rows ``rows`` (int64) of ``layer.dequantize()``, decoding only those."""
    tensors, _ = layer.op_args()
    per_row = _row_tensors(layer.spec, layer.in_features)
    named = {n: t[rows] if n in per_row else t for n, t in zip(layer.op_tensor_names(), tensors)}
    w = layer.codec.decode(named, layer.spec, layer.in_features)
    if layer.spec.rotation:
        w = unrotate(w, named[SIGNS].float(), layer.spec.hadamard_block(layer.in_features))
    return w


class RBEEmbedding(nn.Module):
    """``nn.Embedding`` whose table is the RBE-coded output head ``head`` (module docstring).

    Lookups come out in the head's compute dtype. Nothing is stored here; ``padding_idx`` is
    kept for code that reads it (the padding row is whatever the head's codes decode to).
    """

    def __init__(self, head: RBELinear, padding_idx: int | None = None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = head.out_features, head.in_features, padding_idx
        self.__dict__["head"] = head  # not registered: see the module docstring

    head: RBELinear

    @property
    def weight(self) -> nn.Parameter:
        """The head's codes: what transformers' ``tie_weights`` reads here (tying the head to itself)."""
        return self.head.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"RBEEmbedding takes int32/int64 token ids, got {input_ids.dtype}")
        flat = input_ids.reshape(-1).long()
        if flat.numel():
            low, high = (int(v) for v in torch.aminmax(flat))  # one host sync for both bounds
            if low < 0 or high >= self.num_embeddings:
                raise IndexError(f"token ids must be in [0, {self.num_embeddings}), got [{low}, {high}]")
        distinct, where = torch.unique(flat, return_inverse=True)  # each distinct token decoded once
        rows = decode_rows(self.head, distinct)[where]
        return rows.reshape(*input_ids.shape, self.embedding_dim).to(self.head.compute_dtype)

    def extra_repr(self) -> str:
        bpw = self.head.bits_per_weight
        return f"{self.num_embeddings}, {self.embedding_dim}, codes of the tied output head ({bpw:.3f} bpw)"
