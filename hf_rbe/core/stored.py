"""Embeddings and heads stored in half precision, inside a model that computes in fp32.

After quantization the embedding matrix (and a tied LM head) dominate a small model's file
(SmolLM2-135M: 28M of its 135M weights, 108 MiB in fp32). These twins of ``nn.Embedding`` and
``nn.Linear`` hold their weight in fp16 or bf16 (the embedding casts what it looks up, the head
multiplies in the storage dtype), so a model loaded in fp32 keeps its fp32 activations while
storing half the bytes. Tied weights stay tied (one parameter).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .spec import apply_keeping_dtypes

STORAGE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


class StoredEmbedding(nn.Embedding):
    """``nn.Embedding`` with its table in ``weight.dtype``; lookups come out in ``compute_dtype``,
    which follows casts of the model (the table keeps its dtype)."""

    compute_dtype: torch.dtype

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        out = apply_keeping_dtypes(self, fn, recurse, ["weight"])
        cast = fn(torch.empty(0, dtype=self.compute_dtype)).dtype  # what the model now computes in
        if cast.is_floating_point:
            self.compute_dtype = cast
        return out

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        out = F.embedding(input, self.weight, self.padding_idx, self.max_norm, self.norm_type,
                          self.scale_grad_by_freq, self.sparse)
        return out.to(self.compute_dtype)


class StoredLinear(nn.Linear):
    """``nn.Linear`` with its weight in a storage dtype, multiplied in that dtype (matmuls accumulate
    in fp32) and returned in the input's. Why not cast the weight up: a SmolLM2 head is 28M
    weights, and casting them on every decoding step costs far more than the half-precision
    product itself (docs/results/cpu_speed.md)."""

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        return apply_keeping_dtypes(self, fn, recurse, ["weight"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return stored_linear(x, self.weight, self.bias)


#: ``row(weight, x)``: fp32 [N] of a bf16 [N, K] CPU weight times one row [K], the products summed
#: in fp32, or None where it does not take the weight (``set_cpu_row_product``; ``hf_rbe.kernels``
#: sets a compiled one).
_cpu_row_product: Callable[[torch.Tensor, torch.Tensor], torch.Tensor | None] | None = None


def set_cpu_row_product(row: Callable[[torch.Tensor, torch.Tensor], torch.Tensor | None] | None) -> None:
    """Install (or with ``None`` remove) the CPU product of a bf16 weight and one row that
    :func:`stored_linear` uses for a decoding step's head."""
    global _cpu_row_product
    _cpu_row_product = row


def stored_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x W^T + b`` multiplied in the weight's storage dtype, returned in ``x``'s (``StoredLinear``;
    a serving engine computes a stored head with it to give the same logits). One bf16 row on the
    CPU (a decoding step's head) goes to the installed row product, else ``torch.mv``: both read the
    weight faster there than the matrix product ``F.linear`` takes (``docs/results/cpu_speed.md``);
    either way the row is rounded to bf16 and the result too, as a bf16 product is."""
    if bias is None and weight.dtype == torch.bfloat16 and x.numel() == x.shape[-1] and x.is_cpu:
        row = x.reshape(-1).to(weight.dtype)
        plain = _cpu_row_product is not None and not torch.compiler.is_compiling() and not (
            torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))  # nothing to trace or record
        y = _cpu_row_product(weight, row) if plain else None
        y = torch.mv(weight, row) if y is None else y.to(weight.dtype)
        return y.to(x.dtype).view(*x.shape[:-1], weight.shape[0])
    return matrix_product(x, weight, bias)


def matrix_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`stored_linear` by ``F.linear`` for every input (``bench/row_kernel.py`` times it beside ``torch.mv``)."""
    y = F.linear(x.to(weight.dtype), weight, None if bias is None else bias.to(weight.dtype))
    return y.to(x.dtype)


def store_embeddings(model: nn.Module, dtype: torch.dtype, compute_dtype: torch.dtype) -> int:
    """Store ``model``'s input embedding and float output head (tied or not) in ``dtype``, computing
    in ``compute_dtype`` (the model's), in place; returns the number of modules converted. Works on
    any model with transformers' ``get_input_embeddings`` / ``get_output_embeddings``."""
    if dtype == compute_dtype:
        return 0
    converted = 0
    emb = model.get_input_embeddings()
    new_weights: dict[int, nn.Parameter] = {}  # old parameter -> its stored twin (keeps ties)

    def stored(p: nn.Parameter) -> nn.Parameter:
        if id(p) not in new_weights:
            new_weights[id(p)] = nn.Parameter(p.detach().to(dtype), requires_grad=p.requires_grad)
        return new_weights[id(p)]

    if type(emb) is nn.Embedding and emb.weight.is_floating_point():
        emb.__class__ = StoredEmbedding  # same module, same hooks and attributes; weight swapped below
        emb.compute_dtype = compute_dtype
        emb.weight = stored(emb.weight)
        converted += 1
    head = model.get_output_embeddings()
    if type(head) is nn.Linear and head.weight.is_floating_point():  # a plain float head: stored, in any case
        head.__class__ = StoredLinear
        head.weight = stored(head.weight)
        converted += 1
    return converted
