"""Calibrated RBE: encode each layer against the inputs it really sees, block by block, in bounded memory.

1. **Windows** (``windows``): the calibration text as token windows.
2. **Measure** (optional, ``fisher``): with ``calibration_fisher`` or ``target_bits``, one Fisher
   pass of the full-precision model, block by block; with ``target_bits`` it chooses each layer's
   code planes (``allocate``), which become per-layer overrides.
3. **Blocks, in order** (GPTQ's sequential order): the inputs of block ``i`` are the outputs of
   blocks ``0 .. i-1`` *already quantized*, so each block corrects what the ones before it lost.
   Per block: its float weights come to the calibration device (``weights``: from the model, or
   read from the checkpoint), forward hooks sum ``H = x^T x`` per layer (``capture.Hessians``),
   the full-precision block's outputs are computed (the fine-tune's targets, and the path the
   end-to-end teacher comes from), each layer is encoded with LDLQ against ``H`` (``core.ldlq``)
   and swapped in, the block's scales, biases and norms are fine-tuned (``finetune``), its
   outputs go on to the next block, and it goes back where the model lives; its float weights are
   freed. With ``calibration_work_dir`` every finished block is saved, and a stopped run resumes
   (``work``). Memory: one block's weights and the activations of both paths.
4. **The rest**: layers outside the blocks are encoded calibration-free (a pooler), except an
   output head that ``quantize_embeddings`` codes: its Hessian comes from the final hidden states
   of the quantized blocks; a tied input embedding then reads its codes.
5. **End to end** (optional): the whole model's scales, biases and norms against the
   full-precision model's final hidden states (the full-precision path's, through the final norm).

Every RBE product in these steps is the PyTorch reference's (``core.ops.reference_only``), never a
device kernel's. The model is changed in place; :func:`quantize_calibrated` returns what the caller records in a
copy of its config (the chosen overrides and ``calibrated_with``). The result is an ordinary RBE
model: loading it needs no calibration.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary
from tqdm.auto import tqdm

from ...core.errors import ConfigError
from ...core.ldlq import proxy_error
from ...core.ops import reference_only
from ...core.packed import PackedLinear
from ...core.rbe_linear import RBELinear, swap_layers
from ..config import RBEConfig
from ..replace import LayerFactory, eligible, encode_into, float_weight, share_head_codes, tied_embedding
from .allocate import allocate
from .capture import (
    Call,
    Hessians,
    calls_to,
    find_blocks,
    first_block_inputs,
    head_inputs,
    hidden,
    output_head,
    run_block,
    with_hidden,
)
from .codes import block_code_step
from .finetune import finetune_block, finetune_model, finetune_steps
from .fisher import Fisher, fisher
from .heap import trim
from .phases import phase
from .weights import BlockWeights, storage_device
from .windows import calibration_ids, resolve_tokenizer
from .work import WorkDir, fingerprint

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
    batches: list[torch.Tensor]  # token windows, on the calibration device
    prefix: str
    blocks: nn.ModuleList
    targets: list[str]  # every float layer to encode, in module order (names: the model holds the modules)
    factory: LayerFactory
    tied: tuple[str, str] | None  # (head, input embedding) sharing the head's codes
    ft_steps: int
    code_steps: int
    e2e_steps: int
    weighted: bool  # Fisher-weighted Hessians
    damp: float
    measured: Fisher | None
    allocated: dict[str, dict[str, Any]]  # per-layer planes chosen for ``target_bits``
    device: torch.device  # where blocks are calibrated
    weights: BlockWeights
    work: WorkDir | None
    # Hessian sum -> the fp16 copy layers keep, by identity; an entry goes when its sum is freed, so a later
    # sum that reuses the freed one's id() never picks up another layer's copy
    kept: WeakIdKeyDictionary = field(default_factory=WeakIdKeyDictionary)
    returns_tuple: bool = False  # whether a block returns a tuple (its hidden states first)
    errors: list[float] = field(default_factory=list)  # each calibrated layer's relative output error

    @property
    def fisher_weights(self) -> dict[str, list[torch.Tensor]] | None:
        return self.measured.weights if self.weighted and self.measured else None

    def inner(self, i: int) -> list[str]:
        """Names of the layers to encode in block ``i``."""
        return [n for n in self.targets if n.startswith(f"{self.prefix}.{i}.")]


def calibration_device(config: RBEConfig) -> torch.device:
    """``calibration_device``, else the fastest device present (a GPU when there is one)."""
    if config.calibration_device is not None:
        return torch.device(config.calibration_device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@torch.no_grad()
@reference_only()  # calibrated codes the same with any kernel, or none (ops.reference_only)
def quantize_calibrated(model: nn.Module, config: RBEConfig, skip: list[str], tokenizer: Any = None,
                        weights: BlockWeights | None = None) -> Calibration:
    """Quantize ``model`` in place with calibration (module docstring); ``skip``: module names or
    patterns kept in full precision; ``weights``: where blocks' float weights come from (default:
    the model itself). Returns the overrides and record for the caller's config."""
    config.check_quantizable()
    was_training = model.training
    model.eval()
    try:
        plan = _plan(model, config, skip, tokenizer, weights or BlockWeights(storage_device(model)))
        teacher_head = output_head(model)  # still float
        with phase("blocks"):
            q, fp = _quantize_blocks(model, plan)
        teacher = _teacher(model, plan, fp)
        with phase("head"):
            _quantize_rest(model, plan, q)
        del q, fp  # both paths' final hidden states: the teacher's features and the head's Hessian are taken
        trim()
        if plan.tied:
            share_head_codes(model, plan.tied)
        if teacher:
            windows = [w for b in plan.batches for w in b.split(1)]  # one window per step
            with phase("end-to-end"):
                loss = finetune_model(model, windows, teacher, plan.e2e_steps, config.calibration_e2e_lr,
                                      teacher_head, int(config.calibration_e2e_memory * 2**30))
            logger.info("end-to-end fine-tune: final loss %.4f", loss)
    finally:
        model.train(was_training)
    return Calibration(plan.allocated, _record(config, plan))


def _plan(model: nn.Module, config: RBEConfig, skip: list[str], tokenizer: Any, weights: BlockWeights) -> _Plan:
    tok = resolve_tokenizer(model, config, tokenizer)
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)  # GPT-2: n_positions
    if isinstance(positions, int) and config.calibration_seqlen > positions:
        raise ConfigError(f"calibration_seqlen={config.calibration_seqlen} is longer than the model's "
                          f"{positions} positions (max_position_embeddings): set calibration_seqlen <= {positions}")
    with phase("windows"):
        ids = calibration_ids(config, tok, vocab)
        trim()
    batches = list(ids.to(storage_device(model)).split(config.calibration_batch_size))
    prefix, blocks = find_blocks(model)
    targets = dict(eligible(model, skip))
    ft_steps, e2e_steps = finetune_steps(model, config)
    weighted = config.calibration_fisher if config.calibration_fisher is not None else output_head(model) is None
    damp = config.damp_percent if config.damp_percent is not None else 0.2 if weighted else 0.01
    device = calibration_device(config)
    measured = None
    if weighted or config.target_bits is not None:
        with phase("fisher"):
            measured = fisher(model, targets, batches, config.calibration_seed, weights, device)
    allocated: dict[str, dict[str, Any]] = {}
    if config.target_bits is not None:  # before any layer is built: the chosen planes become overrides
        planes = allocate(config, targets, measured.sensitivity, config.target_bits)  # type: ignore[union-attr]
        allocated = {name: {"planes": list(p)} for name, p in planes.items()}
        config = config.with_calibration(allocated, {})
    work = None
    if config.calibration_work_dir is not None:
        mcfg = getattr(getattr(model, "config", None), "to_dict", dict)()
        shapes = sorted((n, tuple(p.shape), str(p.dtype)) for n, p in model.named_parameters())
        work = WorkDir(config.calibration_work_dir, fingerprint(config.to_dict(), _record(config, None), mcfg,
                                                                 shapes, sorted(skip), ids))
    return _Plan(config, batches, prefix, blocks, list(targets), LayerFactory(config, targets),
                 tied_embedding(model, config), ft_steps, config.calibration_code_steps, e2e_steps, weighted, damp,
                 measured, allocated, device, weights, work)


def _record(config: RBEConfig, plan: _Plan | None) -> dict[str, Any]:
    """``calibrated_with``: how the model was calibrated (names and numbers, not the data)."""
    d = config.dataset
    name = d if isinstance(d, str) else f"{len(d)} texts" if isinstance(d, list) else \
        f"datasets.Dataset ({getattr(d, 'num_rows', '?')} rows)"
    out = {"dataset": name, "samples": config.calibration_samples, "seqlen": config.calibration_seqlen,
           "seed": config.calibration_seed, "target_bits": config.target_bits}
    if config.calibration_code_steps:  # absent at 0: records of runs before code steps existed stay the same
        out["code_steps"] = config.calibration_code_steps
    if plan is not None:
        out.update(damp_percent=plan.damp, finetune_steps=plan.ft_steps, e2e_steps=plan.e2e_steps,
                   fisher=plan.weighted)
    return out


def _start(model: nn.Module, plan: _Plan) -> tuple[int, list[Call], list[torch.Tensor] | None]:
    """(first block to calibrate, its calls, the full-precision path's hidden states): from the
    embeddings, or where a previous run of the same calibration stopped."""
    calls = first_block_inputs(model, plan.blocks[0], plan.batches)
    fp = [hidden(c) for c in calls] if plan.ft_steps or plan.code_steps or plan.e2e_steps else None
    done = plan.work.finished() if plan.work else 0
    if not done:
        return 0, calls, fp
    for i in range(done):
        _swap_block(model, plan, i, encode=False)
        for name in plan.inner(i):
            layer = model.get_submodule(name)
            if layer.weight.device.type == "meta":
                layer.to_empty(device=plan.weights.storage)
        plan.blocks[i].load_state_dict(plan.work.block_state(i))  # type: ignore[union-attr]
        plan.blocks[i].to(plan.weights.storage)
    q, fp = plan.work.activations(len(calls), fp is not None)  # type: ignore[union-attr]
    logger.info("resuming the calibration at block %d of %d (%s)", done, len(plan.blocks), plan.work.path)
    return done, [with_hidden(c, h.to(hidden(c).device)) for c, h in zip(calls, q)], fp


def _quantize_blocks(model: nn.Module, plan: _Plan) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """Step 3 of the module docstring; returns both paths' final hidden states per batch."""
    start, calls, fp = _start(model, plan)
    storage, device = plan.weights.storage, plan.device
    for i in tqdm(range(start, len(plan.blocks)), desc="RBE-calibrating blocks", unit="block", initial=start,
                  total=len(plan.blocks)):
        block = plan.blocks[i]
        plan.weights.materialize(block, f"{plan.prefix}.{i}", device)
        on_device = calls_to(calls, device)  # the same tensors when the device is where they are kept
        hessians = _hessians(model, plan, i, on_device)
        # both paths' activations are replaced window by window, so that a phase holds one extra window
        if fp is not None:
            with phase("full-precision path"):
                for j, c in enumerate(on_device):
                    fp[j] = _run(block, c, fp[j], plan)
        trim()
        with phase("encode"):
            _swap_block(model, plan, i, hessians=hessians)
        kept = hessians if plan.code_steps else {}  # only code steps read them after the encode
        del hessians
        trim()
        if fp is not None and (plan.ft_steps or plan.code_steps):
            _tune_block(model, plan, i, on_device, [h.to(device) for h in fp], kept)
        del kept
        with phase("propagate"):
            for j, d in _drain(on_device):
                calls[j] = with_hidden(calls[j], _run(block, d, hidden(d), plan).to(storage))
        plan.weights.release(block)
        if fp is not None:
            fp[:] = [h.to(storage) for h in fp]
        if plan.work:
            plan.work.save(i, block, [hidden(c) for c in calls], fp)
    return [hidden(c) for c in calls], fp


def _tune_block(model: nn.Module, plan: _Plan, i: int, calls: list[Call], targets: list[torch.Tensor],
                hessians: dict[str, torch.Tensor]) -> None:
    """The block's fine-tune, its steps split evenly around its code steps (``codes``)."""
    block, parts = plan.blocks[i], plan.code_steps + 1
    layers = {n: m for n in plan.inner(i) if isinstance(m := model.get_submodule(n), RBELinear)}
    for k in range(parts):
        steps = plan.ft_steps // parts + (k < plan.ft_steps % parts)
        if steps:
            with phase("block fine-tune"):
                finetune_block(block, calls, targets, steps, plan.config.calibration_finetune_lr)
        if k < plan.code_steps and layers:
            with phase("code steps"):
                step = block_code_step(block, layers, hessians, calls, targets, plan.damp)
            logger.info("block %d code step %d: loss %.4g -> %.4g (kappa %s, %.2f%% of the codes moved)", i, k,
                        step.before, step.after, step.kappa, 100 * step.changed)


def _drain(items: list[Call]) -> Iterator[tuple[int, Call]]:
    """(index, item) of ``items`` in order, each taken out of the list as it is handed out, so that its
    tensors can be freed as soon as the caller is done with it."""
    items.reverse()
    j = 0
    while items:
        yield j, items.pop()
        j += 1


def _run(block: nn.Module, call: Call, h: torch.Tensor, plan: _Plan) -> torch.Tensor:
    args, kwargs = with_hidden(call, h.to(plan.device))
    out = block(*args, **kwargs)
    plan.returns_tuple = isinstance(out, tuple)
    return out[0] if plan.returns_tuple else out


def _hessians(model: nn.Module, plan: _Plan, i: int, calls: list[Call]) -> dict[str, torch.Tensor]:
    with phase("hessians"), Hessians({n: model.get_submodule(n) for n in plan.inner(i)}, plan.fisher_weights) as w:
        for call in calls:
            run_block(plan.blocks[i], call)
    return w.sums()


def _swap_block(model: nn.Module, plan: _Plan, i: int, hessians: dict[str, torch.Tensor] | None = None,
                encode: bool = True) -> None:
    errors = []
    for name in plan.inner(i):
        errors.append(_swap(model, plan, name, None if hessians is None else hessians[name], encode))
        trim()  # this layer's encode transients, before the next layer's pile on top of them
    if hessians is not None and errors:
        logger.info("block %d: mean relative output error on the calibration inputs %.4f", i,
                    sum(errors) / len(errors))


def _teacher(model: nn.Module, plan: _Plan, fp: list[torch.Tensor] | None) -> list[torch.Tensor]:
    """The full-precision model's features, one calibration window each (for the end-to-end step)."""
    if not plan.e2e_steps or fp is None:
        return []
    with phase("teacher"):
        per_batch = head_inputs(model, plan.blocks, plan.batches, fp, plan.returns_tuple)
    return [t for f in per_batch for t in f.cpu().split(1)]


def _quantize_rest(model: nn.Module, plan: _Plan, q: list[torch.Tensor]) -> None:
    """Step 4: layers outside the blocks."""
    head = output_head(model)
    for name in [n for n in plan.targets if not n.startswith(plan.prefix + ".")]:
        module = model.get_submodule(name)
        if module is not head:  # a pooler: calibration-free
            _swap(model, plan, name, None)
            continue
        finals = head_inputs(model, plan.blocks, plan.batches, q, plan.returns_tuple)
        with Hessians({name: module}, plan.fisher_weights) as watch:  # the final hidden states of the quantized blocks
            for x in finals:
                watch.add(name, x)
        error = _swap(model, plan, name, watch.sums()[name])
        logger.info("output head: relative output error on the calibration inputs %.4f", error)


def _swap(model: nn.Module, plan: _Plan, name: str, hessian: torch.Tensor | None, encode: bool = True) -> float:
    """Build the packed layer for ``name``, encode it (unless ``encode`` is off: a resumed block's
    state is loaded afterwards) and swap it in; returns its relative output error on the calibration
    inputs (0 without a Hessian, or when the format cannot hold the layer)."""
    module = model.get_submodule(name)
    layer = plan.factory.build(name, module)
    if layer is None:
        return 0.0
    if encode:
        encode_into(layer, module, name, hessian, plan.damp)
    if hessian is not None and plan.config.keep_calibration_statistics and isinstance(layer, RBELinear):
        # normalised by the mean diagonal: LDLQ does not see the scale, and sums over many tokens overflow fp16;
        # layers that read one input (q, k, v) share one sum and keep one copy
        if hessian not in plan.kept:
            plan.kept[hessian] = (hessian / hessian.diagonal().mean().clamp_min(1e-30)).half()
        layer.calibration_hessian = plan.kept[hessian]
    swap_layers(model, {name: layer})
    if hessian is None or not isinstance(layer, PackedLinear):
        return 0.0
    return proxy_error(float_weight(module), layer.dequantize(torch.float32), hessian)
