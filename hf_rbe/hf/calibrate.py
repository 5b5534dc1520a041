"""Calibrated RBE: encode each layer against the inputs it really sees, block by block.

1. **Text to windows.** ``dataset`` (strings, a ``datasets.Dataset``, or a corpus name) is joined,
   tokenized once and cut into ``calibration_samples`` windows of ``calibration_seqlen`` tokens
   (deterministic), each framed by the tokenizer's special tokens. A named offline corpus skips
   its first ``TRAIN_START`` tokens: that is the held-out text the perplexity recipes score, so
   calibration never sees it.
2. **Sequential blocks.** The model's repeated blocks (decoder layers, encoder layers) are taken
   one at a time: the inputs of block ``i`` are the outputs of blocks ``0 .. i-1`` *already
   quantized* (GPTQ's sequential order), so each block corrects what the ones before it lost.
   Only one block's activations are held at once.
3. **Per layer.** Forward hooks sum ``H = x^T x`` over the calibration tokens for every layer of
   the block (with ``calibration_fisher``, each token weighted by the squared output gradient a
   first Fisher pass measured there: :func:`fisher`); each layer is then encoded with
   ``RBELinear.encode(weight, hessian=H)`` (LDLQ and H-weighted scales, ``core.calibrate``) and
   swapped in.

4. **Block fine-tuning (optional, ``calibration_finetune_steps``).** With the codes fixed, the block's
   per-layer scales, biases and norm weights are trained (Adam) so that on its quantized-path
   inputs it reproduces the full-precision model's activations at its output (as AQLM and
   QuIP# fine-tune their continuous parameters), which also corrects what earlier blocks lost.
5. **End to end (optional, ``calibration_e2e_steps``).** Last, the same parameters of the whole
   model train together against the full-precision model's final hidden states, captured
   before anything was quantized (a language model: the KL divergence of the next-token
   distributions its head gives them), as AQLM's global fine-tuning does.

With ``target_bits``, a Fisher-weighted measurement on the same windows first chooses each
layer's code planes (``allocate``). Layers outside the blocks are encoded calibration-free (a
pooler), except an output head that ``quantize_embeddings`` codes: its Hessian comes from the
final hidden states of the quantized blocks. The result is an ordinary RBE model: loading it
needs no calibration, and its config records how it was made.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm
from transformers.pytorch_utils import Conv1D

from ..core.calibrate import proxy_error
from ..core.errors import ConfigError
from ..core.packed import PackedLinear
from ..core.qat import RBEQATLinear, prepare_qat
from ..core.rbe_linear import RBELinear, link_shared_tables
from ..data import CORPORA, TRAIN_START, text_dataset
from .allocate import allocate
from .config import RBEConfig
from .replace import LayerFactory, eligible, encode_into, float_weight, share_head_codes, tied_embedding

logger = logging.getLogger(__name__)


class _Stop(Exception):
    """Raised by the hook that captures the first block's inputs (nothing after it needs to run)."""


# ----------------------------------------------------------------------------- data


def _texts(dataset: Any) -> list[str]:
    if isinstance(dataset, list):
        return dataset
    if isinstance(dataset, str):
        return list(text_dataset(dataset, hub_split="train")["text"])
    return list(dataset["text"])


def _frame(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The special tokens ``tokenizer`` puts before and after one input (BERT: ``[CLS]`` and
    ``[SEP]``; most language models: nothing, or a BOS)."""
    def ids(special: bool) -> list[int]:
        out = tokenizer("a", add_special_tokens=special).input_ids
        return [int(i) for i in torch.as_tensor(out).flatten()]

    bare, full = ids(False), ids(True)
    for i in range(len(full) - len(bare) + 1):
        if full[i : i + len(bare)] == bare:
            return full[:i], full[i + len(bare) :]
    return [], []


def calibration_ids(config: RBEConfig, tokenizer: Any, vocab_size: int | None) -> torch.Tensor:
    """int64 [samples, seqlen]: windows of the calibration text, the same for the same config,
    each framed by the special tokens the tokenizer puts around one input (an encoder's
    ``[CLS]`` is an attention sink whose activations are far larger than any word's: a layer
    calibrated without it is encoded for inputs it never sees)."""
    dataset, seqlen = config.dataset, config.calibration_seqlen
    named = isinstance(dataset, str) and dataset in CORPORA
    text = "\n\n".join(_texts(dataset))
    if not text.strip():
        raise ConfigError("the calibration dataset holds no text")
    head, tail = _frame(tokenizer)
    body = seqlen - len(head) - len(tail)
    if body < 1:
        raise ConfigError(f"calibration_seqlen={seqlen} leaves no room for text between the tokenizer's "
                          f"{len(head) + len(tail)} special tokens")
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[0]
    if named:  # the held-out start of an offline corpus is what the perplexity recipes score
        ids = ids[TRAIN_START:]
    if ids.numel() < body:
        where = " after the held-out part" if named else ""
        raise ConfigError(f"the calibration text has {ids.numel()} tokens{where}, "
                          f"fewer than calibration_seqlen={seqlen} needs: give more text or a shorter one")
    g = torch.Generator().manual_seed(config.calibration_seed)
    starts = torch.randint(0, ids.numel() - body + 1, (config.calibration_samples,), generator=g)
    windows = torch.stack([torch.cat([torch.tensor(head, dtype=ids.dtype), ids[s : s + body],
                                      torch.tensor(tail, dtype=ids.dtype)]) for s in starts.tolist()])
    top = max([int(ids.max()), *head, *tail])
    if vocab_size is not None and top >= vocab_size:
        raise ConfigError(f"the tokenizer produced id {top}, but the model's vocabulary has {vocab_size} "
                          "entries: is it the model's tokenizer?")
    return windows


def _tokenizer(model: nn.Module, config: RBEConfig, given: Any) -> Any:
    tok = given if given is not None else config.tokenizer
    if tok is None or isinstance(tok, str):
        from transformers import AutoTokenizer

        source = tok or getattr(getattr(model, "config", None), "_name_or_path", None)
        try:
            tok = AutoTokenizer.from_pretrained(source)
        except Exception as err:
            raise ConfigError(f"calibration needs the model's tokenizer: pass tokenizer=... (could not load one "
                              f"from {source!r}: {type(err).__name__})") from err
    if not callable(tok):
        raise ConfigError(f"tokenizer must be a tokenizer or its name, got {type(tok).__name__}")
    return tok


# ----------------------------------------------------------------------------- blocks


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


def _first_block_inputs(model: nn.Module, block: nn.Module, batches: list[torch.Tensor]) -> list[tuple[tuple, dict]]:
    """(args, kwargs) the first block receives for each batch (the model runs only up to it)."""
    captured: list[tuple[tuple, dict]] = []

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.append((args, kwargs))
        raise _Stop

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for ids in batches:
            _run_to_hook(model, ids)
    finally:
        handle.remove()
    return captured


def _run_to_hook(model: nn.Module, ids: torch.Tensor) -> None:
    """Run ``model`` on ``ids`` until a capturing hook raises ``_Stop`` (nothing after it is needed)."""
    try:
        model(input_ids=ids, use_cache=False)
    except _Stop:
        pass


def _hidden(call: tuple[tuple, dict]) -> torch.Tensor:
    args, kwargs = call
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(call: tuple[tuple, dict], h: torch.Tensor) -> tuple[tuple, dict]:
    args, kwargs = call
    return ((h, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": h})


def _run(block: nn.Module, call: tuple[tuple, dict]) -> torch.Tensor:
    out = block(*call[0], **call[1])
    return out[0] if isinstance(out, tuple) else out


class _Hessians:
    """Sums ``x^T x`` of every watched layer's input while the block runs, one call per
    calibration batch. With ``weights`` (:class:`Fisher`), token ``t`` of batch ``j`` counts
    ``weights[name][j][t]`` times. Unweighted layers that read the same input tensor (q, k, v;
    gate, up) share one product and one accumulated sum."""

    def __init__(self, layers: dict[str, nn.Module], weights: dict[str, list[torch.Tensor]] | None = None) -> None:
        self.h: dict[str, torch.Tensor] = {}
        self.weights = weights or {}
        self.calls = dict.fromkeys(layers, 0)
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None  # (the last input, its x^T x)
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in layers.items()]

    def _hook(self, name: str):  # type: ignore[no-untyped-def]
        def add(module: nn.Module, args: tuple, output: Any) -> None:
            x = args[0]
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
        return add

    def close(self) -> dict[str, torch.Tensor]:
        """The sums, by layer (equal sums share one tensor)."""
        for handle in self.handles:
            handle.remove()
        self._last = None
        distinct: list[torch.Tensor] = []
        for name, h in self.h.items():
            self.h[name] = next((d for d in distinct if d.shape == h.shape and torch.equal(d, h)), h)
            if self.h[name] is h:
                distinct.append(h)
        return self.h


# ----------------------------------------------------------------------------- the pipeline


@torch.no_grad()
def quantize_calibrated(model: nn.Module, config: RBEConfig, skip: list[str], tokenizer: Any = None) -> nn.Module:
    """Quantize ``model`` in place with calibration (module docstring); returns it."""
    config.check_quantizable()
    tok = _tokenizer(model, config, tokenizer)
    device = next(model.parameters()).device
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    ids = calibration_ids(config, tok, vocab).to(device)
    batches = list(ids.split(config.calibration_batch_size))
    prefix, blocks = find_blocks(model)
    targets = dict(eligible(model, skip))
    was_training = model.training
    model.eval()
    ft_steps, e2e_steps = finetune_steps(model, config)
    weighted = config.calibration_fisher if config.calibration_fisher is not None else _head(model) is None
    damp = config.damp_percent if config.damp_percent is not None else 0.2 if weighted else 0.01
    measured = fisher(model, targets, batches, config.calibration_seed, keep_features=e2e_steps > 0) \
        if weighted or config.target_bits is not None else None
    if config.target_bits is not None:  # before any layer is built: the chosen planes become overrides
        planes = allocate(config, targets, measured.sensitivity, config.target_bits)
        config.overrides.update({name: {"planes": list(p)} for name, p in planes.items()})
    factory = LayerFactory(config)
    tied = tied_embedding(model, config)
    windows = list(ids.split(1))  # the end-to-end fine-tune takes one window per step
    teacher = [t for f in (measured.features if measured else [features(model, b) for b in batches])
               for t in f.split(1)] if e2e_steps else []
    calls = _first_block_inputs(model, blocks[0], batches)
    fp_calls = calls if ft_steps else None  # the full-precision path, for targets
    errors = []
    for i, block in enumerate(tqdm(blocks, desc="RBE-calibrating blocks", unit="block")):
        inner = {n: m for n, m in targets.items() if n.startswith(f"{prefix}.{i}.")}
        watch = _Hessians(inner, measured.weights if weighted and measured else None)
        try:
            for call in calls:
                _run(block, call)
        finally:  # never leave hooks on the float layers (a failed quantize_model hands them back)
            hessians = watch.close()
        kept = _kept(hessians) if config.keep_calibration_statistics else {}
        if fp_calls is not None:
            fp_calls = [_with_hidden(call, _run(block, call)) for call in fp_calls]
        for name, module in inner.items():
            errors.append(_swap(model, factory, name, module, hessians[name], damp, kept.get(name)))
        link_shared_tables(model)
        if fp_calls is not None:
            finetune_block(block, calls, [_hidden(c) for c in fp_calls], ft_steps, config.calibration_finetune_lr)
            link_shared_tables(model)
        calls = [_with_hidden(call, _run(block, call)) for call in calls]
    head = _head(model)  # still float: the end-to-end teacher's head
    for name, module in [(n, m) for n, m in targets.items() if not n.startswith(prefix + ".")]:
        hessian = None  # outside the blocks (a pooler): calibration-free, except an output head
        if module is head:  # its inputs: the final hidden states of the quantized blocks
            watch = _Hessians({name: module}, measured.weights if weighted and measured else None)
            try:
                for ids in batches:
                    model(input_ids=ids, use_cache=False)
            finally:
                hessian = watch.close()[name]
        kept = _kept({name: hessian}) if hessian is not None and config.keep_calibration_statistics else {}
        error = _swap(model, factory, name, module, hessian, damp, kept.get(name))
        if hessian is not None:
            errors.append(error)
    if tied:
        share_head_codes(model, tied)
    link_shared_tables(model)
    if teacher:
        loss = finetune_model(model, windows, teacher, e2e_steps, config.calibration_e2e_lr, head)
        link_shared_tables(model)
        logger.info("end-to-end fine-tune: final loss %.4f", loss)
    model.train(was_training)
    if errors:
        logger.info("calibrated %d layers; mean relative output error on the calibration inputs %.4f",
                    len(errors), sum(errors) / len(errors))
    config.calibrated_with = {**config.calibration_record(), "finetune_steps": ft_steps, "e2e_steps": e2e_steps,
                              "fisher": weighted, "damp_percent": damp}
    return model


def _head(model: nn.Module) -> nn.Module | None:
    return model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None


def _logits(head: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """[tokens, vocab] fp32 logits of final hidden states ``h`` through the model's output head
    (a float head multiplies in fp32; a coded or QAT head runs as it is)."""
    if isinstance(head, (PackedLinear, RBEQATLinear)):
        return head(h).float().flatten(0, -2)
    b = None if getattr(head, "bias", None) is None else head.bias.float()
    return F.linear(h.float(), head.weight.float(), b).flatten(0, -2)


def finetune_steps(model: nn.Module, config: RBEConfig) -> tuple[int, int]:
    """(per-block, end-to-end) fine-tuning steps; ``None`` settings: 32 for a model with an output
    head, none for an encoder (measured: ``RBEConfig``'s docstring)."""
    auto = 32 if _head(model) is not None else 0
    ft, e2e = config.calibration_finetune_steps, config.calibration_e2e_steps
    return (auto if ft is None else ft), (auto if e2e is None else e2e)


def finetune_block(block: nn.Module, calls: list[tuple[tuple, dict]], targets: list[torch.Tensor], steps: int,
                   lr: float) -> float:
    """Train the block's continuous parameters (per-layer scales, biases, norm weights; codes and
    shared tables fixed) so that, on its quantized-path inputs, it reproduces the full-precision
    model's activations at its output. Returns the final relative error."""
    def loss(step: int) -> torch.Tensor:
        j = step % len(calls)
        out, tgt = _run(block, calls[j]).float(), targets[j].float()
        return (out - tgt).pow(2).mean() / tgt.pow(2).mean().clamp_min(1e-30)

    return train_continuous(block, loss, steps, lr)


def features(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """What the end-to-end fine-tune matches: the input of the output head (the final hidden
    states a language model turns into logits) or, with no head, the last block's output."""
    head = _head(model)
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
        _run_to_hook(model, ids)
    finally:
        handle.remove()
    return captured[0]


def finetune_model(model: nn.Module, batches: list[torch.Tensor], teacher: list[torch.Tensor], steps: int,
                   lr: float, teacher_head: nn.Module | None = None) -> float:
    """End-to-end fine-tune of every continuous parameter (scales, biases, norms) of the quantized
    ``model`` against the full-precision model's :func:`features` (``teacher``, one per batch):
    for a language model the KL divergence of the next-token distributions (the student's through
    the model's head, the teacher's through ``teacher_head``, the full-precision head when the
    model's is coded; default: the model's), otherwise the relative squared error. Returns the
    final loss."""
    teacher_head = teacher_head if teacher_head is not None else _head(model)
    decoded: dict[int, nn.Linear] = {}  # a coded head that is not trained, decoded once

    def loss(step: int) -> torch.Tensor:
        j = step % len(batches)
        out, tgt = features(model, batches[j]), teacher[j].float()
        head = _head(model)  # QAT swaps a coded head it trains
        if head is None:
            return (out.float() - tgt).pow(2).mean() / tgt.pow(2).mean().clamp_min(1e-30)
        if isinstance(head, PackedLinear):  # frozen (a tied head): its decoded weight, not a decode per pass
            head = decoded.setdefault(id(head), head.to_linear().requires_grad_(False))
        student = torch.log_softmax(_logits(head, out), -1)
        with torch.no_grad():
            target = torch.log_softmax(_logits(teacher_head, tgt), -1)
        return F.kl_div(student, target, log_target=True, reduction="batchmean")

    return train_continuous(model, loss, steps, lr, progress="RBE fine-tuning end to end")


@torch.enable_grad()
def train_continuous(module: nn.Module, loss: Callable[[int], torch.Tensor], steps: int, lr: float,
                     progress: str | None = None) -> float:
    """Adam on ``module``'s continuous RBE parameters (per-layer scales, biases, norm weights;
    codes and tables fixed) for ``steps`` steps of ``loss(step)``; RBE layers are put back with
    the trained scales. ``progress``: a progress bar's title (``None``: no bar). Returns the last loss."""
    prepare_qat(module, train_quantizer=True)
    qat = [m for m in module.modules() if isinstance(m, RBEQATLinear)]
    params = [p for m in qat for p in m.trainable_scales()]
    params += [m.bias for m in qat if m.bias is not None]
    params += [p for m in norms(module) for p in m.parameters(recurse=False)]
    was = {id(p): p.requires_grad for p in module.parameters()}
    for p in module.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    # Adam steps on fp32 master copies: in a half-precision model its second moments underflow
    # and its updates become inf (fp16) or vanish (bf16).
    masters = [p.detach().float().requires_grad_(True) for p in params]
    opt = torch.optim.Adam(masters, lr=lr)
    err = 0.0
    for step in tqdm(range(steps), desc=progress, unit="step", disable=progress is None):
        value = loss(step)
        value.backward()
        for p, m in zip(params, masters):
            m.grad = None if p.grad is None else p.grad.float()
            p.grad = None
        opt.step()
        with torch.no_grad():
            for p, m in zip(params, masters):
                p.copy_(m)
        err = float(value.detach())
    for p in module.parameters():
        p.requires_grad_(was.get(id(p), False))
    for name, m in list(module.named_modules()):  # the trained scales (fp16) into the codes, RBE layers back
        if isinstance(m, RBEQATLinear):
            module.set_submodule(name, m.to_rbe())
    return err


def norms(module: nn.Module) -> list[nn.Module]:
    """The normalisation layers inside ``module`` (the calibration fine-tune trains their weights)."""
    return [m for m in module.modules() if "norm" in type(m).__name__.lower()]


def _kept(hessians: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The fp16 copies layers keep: normalised by their mean diagonal (LDLQ does not see the
    scale, and sums over many tokens would overflow fp16), one copy per shared sum."""
    copies: dict[int, torch.Tensor] = {}
    for h in hessians.values():
        if id(h) not in copies:
            copies[id(h)] = (h / h.diagonal().mean().clamp_min(1e-30)).half()
    return {name: copies[id(h)] for name, h in hessians.items()}


def _swap(model: nn.Module, factory: LayerFactory, name: str, module: nn.Module, hessian: torch.Tensor | None,
          damp: float, keep: torch.Tensor | None) -> float:
    """Build, encode and swap in the packed layer for ``module`` (``keep``: statistics to leave on it);
    returns its relative output error on the calibration inputs."""
    layer = factory.build(name, module)
    if layer is None:
        return 0.0
    encode_into(layer, module, name, hessian, damp)
    if keep is not None and isinstance(layer, RBELinear):
        layer.calibration_hessian = keep
    model.set_submodule(name, layer)
    if hessian is None or not isinstance(layer, PackedLinear):
        return 0.0
    link_shared_tables(model)
    return proxy_error(float_weight(module), layer.dequantize(torch.float32), hessian)


@dataclass
class Fisher:
    """What one forward and backward pass of the full-precision model says about each layer."""

    weights: dict[str, list[torch.Tensor]]  # per batch: [batch, seq] mean squared output gradient per token
    sensitivity: dict[str, float]  # ``s_l`` of ``allocate``'s docstring
    features: list[torch.Tensor]  # per batch with ``keep_features``: :func:`features` (the end-to-end teacher)


@torch.enable_grad()
def fisher(model: nn.Module, layers: dict[str, nn.Module], batches: list[torch.Tensor], seed: int = 0,
           keep_features: bool = False) -> Fisher:
    """Gradients at every layer's output under the Fisher information: a language model
    backpropagates next-token labels sampled from its own distribution, an encoder random
    Gaussian projections of its last hidden states. Each token's mean squared gradient (normalised
    to mean 1 per layer) weighs it in the layer's Hessian: the output error ``|dW x_t|^2`` then
    counts as much as it moves the model's output, so tokens the model leans on (an encoder's
    ``[CLS]`` attention sink, whose value vectors every token reads) are encoded most exactly."""
    head = _head(model)
    weights: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    sums = dict.fromkeys(layers, 0.0)
    seen: list[torch.Tensor] = []

    def watch(name: str, module: nn.Module) -> Any:
        w = float_weight(module).float()
        rows = w.pow(2).sum(1) / w.shape[1]

        def forward(mod: nn.Module, args: tuple, out: torch.Tensor) -> None:
            x = args[0].detach().float()
            inputs = x.pow(2).sum(-1) / x.shape[-1]

            def backward(g: torch.Tensor) -> None:
                g2 = g.detach().float().pow(2)
                weights[name].append(g2.mean(-1))
                sums[name] += float((g2 @ rows * inputs).sum())

            out.register_hook(backward)
        return forward

    # Gradients flow from the embedding output only: the weights' own gradients are not needed.
    grads = {id(p): p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    handles = [model.get_input_embeddings().register_forward_hook(lambda m, a, out: out.detach().requires_grad_())]
    handles += [m.register_forward_hook(watch(n, m)) for n, m in layers.items()]
    g = torch.Generator(device=batches[0].device).manual_seed(seed)
    try:
        for ids in tqdm(batches, desc="RBE-measuring output sensitivity", unit="batch"):
            out = features(model, ids)
            if keep_features:
                seen.append(out.detach())
            h = out.float()
            if head is not None:  # through the head's own forward when its hooks measure it
                logits = head(out).float().flatten(0, -2) if head in layers.values() else _logits(head, h)
                with torch.no_grad():
                    labels = torch.multinomial(logits.softmax(-1), 1, generator=g)[:, 0]
                loss = F.cross_entropy(logits, labels, reduction="sum")
            else:
                loss = (h * torch.randn(h.shape, generator=g, device=h.device)).sum()
            loss.backward()
    finally:
        for handle in handles:
            handle.remove()
        for p in model.parameters():
            p.requires_grad_(grads[id(p)])
    for name, per_batch in weights.items():
        if len(per_batch) != len(batches):  # a layer the loss does not reach (a pooler) stays unweighted
            weights[name] = []
            continue
        mean = torch.cat([w.flatten() for w in per_batch]).mean().clamp_min(1e-30)
        weights[name] = [w / mean for w in per_batch]
    return Fisher({n: w for n, w in weights.items() if w}, sums, seen)
