"""Running parts of a model on the calibration windows and capturing what they see.

A model is taken as its repeated blocks (decoder or encoder layers, :func:`find_blocks`) with
something before them (embeddings) and after them (a final norm, an output head). The inputs of
the first block are captured once per batch (:func:`first_block_inputs`: the model runs only up
to it); from there each block runs on its own (:func:`run_block`), and forward hooks sum each
layer's input second moments (:class:`Hessians`). :func:`features` captures what an output head
reads (or the last block's output, for an encoder).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from ...core.errors import ConfigError
from ...core.packed import PackedLinear

#: (args, kwargs) of one block call.
Call = tuple[tuple, dict]


class _Stop(Exception):
    """Raised by a capturing hook: nothing after it needs to run."""


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's repeated blocks: the largest ``ModuleList`` of same-type modules with Linear layers."""
    best: tuple[str, nn.ModuleList, int] | None = None
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) and all(type(c) is type(m[0]) for c in m) and \
                any(isinstance(x, (nn.Linear, Conv1D)) for x in m[0].modules()):
            size = sum(p.numel() for p in m.parameters())
            if best is None or size > best[2]:
                best = (name, m, size)
    if best is None:
        raise ConfigError("calibration found no repeated blocks of Linear layers in this model")
    return best[0], best[1]


def output_head(model: nn.Module) -> nn.Module | None:
    """The model's output head (``get_output_embeddings``), ``None`` for an encoder."""
    return model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None


def run_to_hook(model: nn.Module, ids: torch.Tensor) -> None:
    """Run ``model`` on ``ids`` until a capturing hook raises ``_Stop``."""
    try:
        model(input_ids=ids, use_cache=False)
    except _Stop:
        pass


def first_block_inputs(model: nn.Module, block: nn.Module, batches: list[torch.Tensor]) -> list[Call]:
    """(args, kwargs) the first block receives for each batch (the model runs only up to it)."""
    captured: list[Call] = []

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.append((args, kwargs))
        raise _Stop

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for ids in batches:
            run_to_hook(model, ids)
    finally:
        handle.remove()
    return captured


def hidden(call: Call) -> torch.Tensor:
    """The hidden states of a block call."""
    args, kwargs = call
    return args[0] if args else kwargs["hidden_states"]


def with_hidden(call: Call, h: torch.Tensor) -> Call:
    """The same call with other hidden states."""
    args, kwargs = call
    return ((h, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})


def run_block(block: nn.Module, call: Call) -> torch.Tensor:
    """The block's output hidden states for one call."""
    out = block(*call[0], **call[1])
    return out[0] if isinstance(out, tuple) else out


def features(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """What the end-to-end fine-tune matches: the input of the output head (the final hidden
    states a language model turns into logits) or, with no head, the last block's output."""
    head = output_head(model)
    captured: list[torch.Tensor] = []
    if head is not None:
        def pre(module: nn.Module, args: tuple) -> None:
            captured.append(args[0])
            raise _Stop
        handle = head.register_forward_pre_hook(pre)
    else:
        def post(module: nn.Module, args: tuple, out: Any) -> None:
            captured.append(out[0] if isinstance(out, tuple) else out)
            raise _Stop
        handle = find_blocks(model)[1][-1].register_forward_hook(post)
    try:
        run_to_hook(model, ids)
    finally:
        handle.remove()
    return captured[0]


def logits(head: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """[tokens, vocab] fp32 logits of final hidden states ``h`` through an output head (a float head
    multiplies in fp32; a coded head runs as it is)."""
    if isinstance(head, PackedLinear):
        return head(h).float().flatten(0, -2)
    b = None if getattr(head, "bias", None) is None else head.bias.float()
    return F.linear(h.float(), head.weight.float(), b).flatten(0, -2)


class Hessians:
    """Sums ``x^T x`` of every watched layer's input while the block runs, one call per
    calibration batch. With ``weights`` (``fisher.Fisher``), token ``t`` of batch ``j`` counts
    ``weights[name][j][t]`` times. Unweighted layers that read the same input tensor (q, k, v;
    gate, up) share one product and one accumulated sum. Use as a context manager: the hooks
    come off whatever happens."""

    def __init__(self, layers: dict[str, nn.Module], weights: dict[str, list[torch.Tensor]] | None = None) -> None:
        self.layers, self.weights = layers, weights or {}
        self.h: dict[str, torch.Tensor] = {}
        self.calls = dict.fromkeys(layers, 0)
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None  # (the last input, its x^T x)
        self.handles: list[Any] = []

    def __enter__(self) -> Hessians:
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in self.layers.items()]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()
        self._last = None

    def _hook(self, name: str):  # type: ignore[no-untyped-def]
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            self.add(name, args[0])
        return hook

    def add(self, name: str, x: torch.Tensor) -> None:
        """Add one batch of layer ``name``'s inputs ``x`` [..., in_features] (the hooks call this)."""
        if name in self.weights:
            flat = x.detach().reshape(-1, x.shape[-1]).float()
            flat = flat * self.weights[name][self.calls[name]].reshape(-1, 1).to(flat).sqrt()
            h = flat.T @ flat
        else:
            if self._last is None or self._last[0] is not x:
                flat = x.detach().reshape(-1, x.shape[-1]).float()
                self._last = (x, flat.T @ flat)
            h = self._last[1]
        self.calls[name] += 1
        self.h[name] = h.clone() if name not in self.h else self.h[name].add_(h)

    def sums(self) -> dict[str, torch.Tensor]:
        """The sums, by layer (equal sums share one tensor)."""
        distinct: list[torch.Tensor] = []
        for name, h in self.h.items():
            self.h[name] = next((d for d in distinct if d.shape == h.shape and torch.equal(d, h)), h)
            if self.h[name] is h:
                distinct.append(h)
        return self.h


def calls_to(calls: list[Call], device: torch.device) -> list[Call]:
    """The calls with every tensor argument on ``device``."""
    def move(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return v.to(device)
        if isinstance(v, tuple):
            return tuple(move(x) for x in v)
        return v

    return [(tuple(move(a) for a in args), {k: move(v) for k, v in kwargs.items()}) for args, kwargs in calls]


class _Replay(nn.Module):
    """Stands in for a block: passes its hidden states through, or (``value`` set) returns those."""

    def __init__(self, block: nn.Module, returns_tuple: bool) -> None:
        super().__init__()
        self.block, self.returns_tuple = block, returns_tuple
        self.value: torch.Tensor | None = None

    def __getattr__(self, name: str) -> Any:  # attributes the model's loop reads (``attention_type``)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["block"], name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        h = self.value if self.value is not None else (args[0] if args else kwargs["hidden_states"])
        return (h,) if self.returns_tuple else h


@contextlib.contextmanager
def replayed(blocks: nn.ModuleList, returns_tuple: bool) -> Iterator[list[_Replay]]:
    """The blocks replaced by pass-throughs inside the block (set ``[-1].value`` to what the last
    one should output): the model then computes only what comes after them (a final norm)."""
    originals = list(blocks)
    replays = [_Replay(b, returns_tuple) for b in originals]
    try:
        for i, r in enumerate(replays):
            blocks[i] = r
        yield replays
    finally:
        for i, b in enumerate(originals):
            blocks[i] = b


def head_inputs(model: nn.Module, blocks: nn.ModuleList, batches: list[torch.Tensor], hiddens: list[torch.Tensor],
                returns_tuple: bool) -> list[torch.Tensor]:
    """:func:`features` of each batch when the last block outputs ``hiddens[j]`` (:func:`replayed`)."""
    out = []
    with replayed(blocks, returns_tuple) as replays:
        for ids, h in zip(batches, hiddens):
            replays[-1].value = h.to(ids.device)
            out.append(features(model, ids).detach())
    return out
