"""Calibrated RBE: encode each layer against the inputs it really sees, block by block.

1. **Windows** (``windows``): the calibration text as token windows.
2. **Measure** (optional, ``fisher``): with ``calibration_fisher`` or ``target_bits``, one Fisher
   pass of the full-precision model; with ``target_bits`` it chooses each layer's code planes
   (``allocate``), which become per-layer overrides.
3. **Blocks, in order** (GPTQ's sequential order): the inputs of block ``i`` are the outputs of
   blocks ``0 .. i-1`` *already quantized*, so each block corrects what the ones before it lost.
   Per block: forward hooks sum ``H = x^T x`` per layer (``capture.Hessians``), each layer is
   encoded with LDLQ against ``H`` (``core.ldlq``) and swapped in, then (optionally) the block's
   scales, biases and norms are fine-tuned to reproduce the full-precision block's outputs
   (``finetune``). Only one block's activations are held at once.
4. **The rest**: layers outside the blocks are encoded calibration-free (a pooler), except an
   output head that ``quantize_embeddings`` codes: its Hessian comes from the final hidden states
   of the quantized blocks; a tied input embedding then reads its codes.
5. **End to end** (optional): the whole model's scales, biases and norms against the
   full-precision model's final hidden states, captured before anything was quantized.

The model is changed in place; :func:`quantize_calibrated` returns what the caller records in a
copy of its config (the chosen overrides and ``calibrated_with``). The result is an ordinary RBE
model: loading it needs no calibration.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ...core.ldlq import proxy_error
from ...core.packed import PackedLinear
from ...core.rbe_linear import RBELinear, swap_layers
from ..config import RBEConfig
from ..replace import LayerFactory, eligible, encode_into, float_weight, share_head_codes, tied_embedding
from .allocate import allocate
from .capture import Hessians, features, find_blocks, first_block_inputs, hidden, output_head, run_block, with_hidden
from .finetune import finetune_block, finetune_model, finetune_steps
from .fisher import Fisher, fisher
from .phases import phase
from .windows import calibration_ids, resolve_tokenizer

logger = logging.getLogger(__name__)


@dataclass
class Calibration:
    """What a calibration chose and how it ran: ``overrides`` (per-layer planes from
    ``target_bits``) and ``record`` (``calibrated_with``)."""

    overrides: dict[str, dict[str, Any]]
    record: dict[str, Any]


@dataclass
class _Plan:
    """Everything fixed before the first layer is encoded."""

    config: RBEConfig  # the caller's, with the allocated overrides: what the layers are built from
    batches: list[torch.Tensor]
    prefix: str
    blocks: nn.ModuleList
    targets: dict[str, nn.Module]  # every float layer to encode, by name, in module order
    tied: tuple[str, str] | None  # (head, input embedding) sharing the head's codes
    ft_steps: int
    e2e_steps: int
    weighted: bool  # Fisher-weighted Hessians
    damp: float
    measured: Fisher | None
    allocated: dict[str, dict[str, Any]]  # per-layer planes chosen for ``target_bits``
    factory: LayerFactory = field(init=False)
    kept: dict[int, torch.Tensor] = field(default_factory=dict)  # id(Hessian sum) -> the fp16 copy layers keep

    def __post_init__(self) -> None:
        self.factory = LayerFactory(self.config, self.targets)

    @property
    def weights(self) -> dict[str, list[torch.Tensor]] | None:
        return self.measured.weights if self.weighted and self.measured else None


@torch.no_grad()
def quantize_calibrated(model: nn.Module, config: RBEConfig, skip: list[str], tokenizer: Any = None) -> Calibration:
    """Quantize ``model`` in place with calibration (module docstring); ``skip``: module names or
    patterns kept in full precision. Returns the overrides and record for the caller's config."""
    config.check_quantizable()
    was_training = model.training
    model.eval()
    try:
        plan = _plan(model, config, skip, tokenizer)
        with phase("teacher"):
            teacher = _teacher(model, plan)  # before anything is quantized
        teacher_head = output_head(model)  # still float
        with phase("blocks"):
            errors = _quantize_blocks(model, plan)
        with phase("head"):
            errors += _quantize_rest(model, plan)
        if plan.tied:
            share_head_codes(model, plan.tied)
        if teacher:
            windows = [w for b in plan.batches for w in b.split(1)]  # one window per step
            with phase("end-to-end"):
                loss = finetune_model(model, windows, teacher, plan.e2e_steps, config.calibration_e2e_lr,
                                      teacher_head)
            logger.info("end-to-end fine-tune: final loss %.4f", loss)
    finally:
        model.train(was_training)
    if errors:
        logger.info("calibrated %d layers; mean relative output error on the calibration inputs %.4f",
                    len(errors), sum(errors) / len(errors))
    return Calibration(plan.allocated, _record(config, plan))


def _plan(model: nn.Module, config: RBEConfig, skip: list[str], tokenizer: Any) -> _Plan:
    tok = resolve_tokenizer(model, config, tokenizer)
    device = next(model.parameters()).device
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    with phase("windows"):
        batches = list(calibration_ids(config, tok, vocab).to(device).split(config.calibration_batch_size))
    prefix, blocks = find_blocks(model)
    targets = dict(eligible(model, skip))
    ft_steps, e2e_steps = finetune_steps(model, config)
    weighted = config.calibration_fisher if config.calibration_fisher is not None else output_head(model) is None
    damp = config.damp_percent if config.damp_percent is not None else 0.2 if weighted else 0.01
    measured = None
    if weighted or config.target_bits is not None:
        with phase("fisher"):
            measured = fisher(model, targets, batches, config.calibration_seed, keep_features=e2e_steps > 0)
    allocated: dict[str, dict[str, Any]] = {}
    if config.target_bits is not None:  # before any layer is built: the chosen planes become overrides
        planes = allocate(config, targets, measured.sensitivity, config.target_bits)  # type: ignore[union-attr]
        allocated = {name: {"planes": list(p)} for name, p in planes.items()}
        config = config.with_calibration(allocated, {})
    return _Plan(config, batches, prefix, blocks, targets, tied_embedding(model, config), ft_steps, e2e_steps,
                 weighted, damp, measured, allocated)


def _record(config: RBEConfig, plan: _Plan) -> dict[str, Any]:
    """``calibrated_with``: how the model was calibrated (names and numbers, not the data)."""
    d = config.dataset
    name = d if isinstance(d, str) else f"{len(d)} texts" if isinstance(d, list) else \
        f"datasets.Dataset ({getattr(d, 'num_rows', '?')} rows)"
    return {"dataset": name, "samples": config.calibration_samples, "seqlen": config.calibration_seqlen,
            "seed": config.calibration_seed, "damp_percent": plan.damp, "finetune_steps": plan.ft_steps,
            "e2e_steps": plan.e2e_steps, "fisher": plan.weighted, "target_bits": config.target_bits}


def _teacher(model: nn.Module, plan: _Plan) -> list[torch.Tensor]:
    """The full-precision model's features, one calibration window each (for the end-to-end step)."""
    if not plan.e2e_steps:
        return []
    per_batch = plan.measured.features if plan.measured else [features(model, b) for b in plan.batches]
    return [t for f in per_batch for t in f.split(1)]


def _quantize_blocks(model: nn.Module, plan: _Plan) -> list[float]:
    """Steps 3 of the module docstring; returns each layer's relative output error."""
    calls = first_block_inputs(model, plan.blocks[0], plan.batches)
    fp_calls = calls if plan.ft_steps else None  # the full-precision path: the fine-tune's targets
    errors: list[float] = []
    for i, block in enumerate(tqdm(plan.blocks, desc="RBE-calibrating blocks", unit="block")):
        inner = {n: m for n, m in plan.targets.items() if n.startswith(f"{plan.prefix}.{i}.")}
        with phase("hessians"), Hessians(inner, plan.weights) as watch:
            for call in calls:
                run_block(block, call)
        hessians = watch.sums()
        if fp_calls is not None:
            with phase("full-precision path"):
                fp_calls = [with_hidden(call, run_block(block, call)) for call in fp_calls]
        with phase("encode"):
            errors += [_swap(model, plan, name, module, hessians[name]) for name, module in inner.items()]
        if fp_calls is not None:
            with phase("block fine-tune"):
                finetune_block(block, calls, [hidden(c) for c in fp_calls], plan.ft_steps,
                               plan.config.calibration_finetune_lr)
        with phase("propagate"):
            calls = [with_hidden(call, run_block(block, call)) for call in calls]
    return errors


def _quantize_rest(model: nn.Module, plan: _Plan) -> list[float]:
    """Step 4: layers outside the blocks; returns the coded head's relative output error."""
    head = output_head(model)
    errors = []
    for name, module in [(n, m) for n, m in plan.targets.items() if not n.startswith(plan.prefix + ".")]:
        if module is not head:  # a pooler: calibration-free
            _swap(model, plan, name, module, None)
            continue
        with Hessians({name: module}, plan.weights) as watch:  # the final hidden states of the quantized blocks
            for ids in plan.batches:
                watch.add(name, features(model, ids))
        errors.append(_swap(model, plan, name, module, watch.sums()[name]))
    return errors


def _swap(model: nn.Module, plan: _Plan, name: str, module: nn.Module, hessian: torch.Tensor | None) -> float:
    """Build, encode and swap in the packed layer for ``module``; returns its relative output error
    on the calibration inputs (0 without a Hessian, or when the format cannot hold the layer)."""
    layer = plan.factory.build(name, module)
    if layer is None:
        return 0.0
    encode_into(layer, module, name, hessian, plan.damp)
    if hessian is not None and plan.config.keep_calibration_statistics and isinstance(layer, RBELinear):
        # normalised by the mean diagonal: LDLQ does not see the scale, and sums over many tokens overflow fp16;
        # layers that read one input (q, k, v) share one sum and keep one copy
        if id(hessian) not in plan.kept:
            plan.kept[id(hessian)] = (hessian / hessian.diagonal().mean().clamp_min(1e-30)).half()
        layer.calibration_hessian = plan.kept[id(hessian)]
    swap_layers(model, {name: layer})
    if hessian is None or not isinstance(layer, PackedLinear):
        return 0.0
    return proxy_error(float_weight(module), layer.dequantize(torch.float32), hessian)
