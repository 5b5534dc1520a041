"""Quality and size measurements shared by the recipes, the benchmarks and the CLI.

Each function states what it measured (context, stride, token count) in what it returns,
so a number can never be quoted without its conditions.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .modules import RBELinear
from .seed64_module import Seed64Linear


@dataclass
class Perplexity:
    perplexity: float
    nll: float
    tokens_scored: int
    tokens_total: int
    context: int
    stride: int
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def perplexity(model: nn.Module, input_ids: torch.Tensor, context: int = 1024, stride: int = 512,
               batch_size: int = 4, progress: bool = True) -> Perplexity:
    """Sliding-window perplexity of a causal LM over one token stream ``input_ids`` [T].

    Each window holds ``context`` tokens and moves ``stride`` tokens; only the tokens new to a
    window are scored (each with at least ``context - stride`` tokens of history, except in
    the first window), the usual transformers recipe. Windows are batched.
    """
    if input_ids.dim() != 1:
        raise ValueError("input_ids must be one token stream [T]")
    if not 0 < stride <= context:
        raise ValueError(f"need 0 < stride <= context, got stride={stride}, context={context}")
    t0 = time.perf_counter()
    device = next(model.parameters()).device
    total = input_ids.numel()
    windows = []  # (begin, end, number of scored tokens at the end of the window)
    prev_end = 0
    for begin in range(0, total, stride):
        end = min(begin + context, total)
        if end - begin < 2:
            break
        windows.append((begin, end, end - max(prev_end, begin + 1)))
        prev_end = end
        if end == total:
            break
    from .metrics import load

    metric = load("perplexity")
    for i in tqdm(range(0, len(windows), batch_size), desc="perplexity", unit="batch", disable=not progress):
        chunk = windows[i : i + batch_size]
        width = max(e - b for b, e, _ in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        for r, (b, e, n_new) in enumerate(chunk):
            ids[r, : e - b] = input_ids[b:e]
            mask[r, : e - b] = 1
            labels[r, e - b - n_new : e - b] = input_ids[e - n_new : e]
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        # position t predicts token t+1
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        tgt = labels[:, 1:].to(device)
        keep = tgt != -100
        token_nll = -logp.gather(-1, tgt.clamp_min(0)[..., None]).squeeze(-1).double() * keep
        metric.add_batch(predictions=token_nll.sum(1).tolist(), references=keep.sum(1).tolist())
    res = metric.compute(context=context, stride=stride)
    return Perplexity(res["perplexity"], res["nll"], res["tokens_scored"], total, context, stride,
                      time.perf_counter() - t0)


@torch.no_grad()
def mean_pooled_embeddings(model: nn.Module, tokenizer: Any, sentences: list[str], batch_size: int = 64,
                           max_length: int = 128) -> torch.Tensor:
    """Sentence embeddings as sentence-transformers computes them for MiniLM: masked mean, L2-normalised."""
    out = []
    for i in range(0, len(sentences), batch_size):
        x = tokenizer(sentences[i : i + batch_size], return_tensors="pt", padding=True, truncation=True,
                      max_length=max_length)
        h = model(**x).last_hidden_state.float()
        m = x["attention_mask"][..., None].to(h.dtype)
        out.append(torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1))
    return torch.cat(out)


def _tensor_bits(t: torch.Tensor) -> int:
    return t.numel() * min(16, t.element_size() * 8) if t.is_floating_point() else t.numel() * t.element_size() * 8


def quantized_size(model: nn.Module) -> tuple[int, float]:
    """(weights in the quantized layers, bits they store). RBE and seed64 layers report their
    own storage; other quantized layers are counted from their state dict minus the bias."""
    weights, bits = 0, 0.0
    inside: set[str] = set()
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        kind = type(module).__module__
        if isinstance(module, (RBELinear, Seed64Linear)):
            weights += module.in_features * module.out_features
            bits += module.storage_bits()
        elif kind.startswith("hqq."):
            weights += int(torch.Size(module.meta["shape"]).numel())
            bits += module.W_q.numel() * module.W_q.element_size() * 8
            bits += sum(_tensor_bits(module.meta[k]) for k in ("scale", "zero") if torch.is_tensor(module.meta.get(k)))
        elif kind.startswith(("optimum.quanto", "bitsandbytes")) and hasattr(module, "in_features"):
            weights += module.in_features * module.out_features
            bits += sum(_tensor_bits(t) for k, t in module.state_dict().items() if k != "bias" and torch.is_tensor(t))
        else:
            continue
        inside.add(name)
    return weights, bits


def model_size(model: nn.Module) -> dict[str, float]:
    """Bits per weight of the quantized layers (everything stored) and bytes of the whole state dict."""
    n, bits = quantized_size(model)
    layers = sum(isinstance(m, (RBELinear, Seed64Linear)) for m in model.modules()) - sum(
        isinstance(m, Seed64Linear) and m.residual is not None for m in model.modules())
    state_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return {"rbe_layers": layers, "rbe_weights": n, "bits_per_weight": bits / n if n else float("nan"),
            "rbe_bytes": bits / 8, "state_dict_bytes": state_bytes}


def wikipedia_ids(tokenizer: Any) -> torch.Tensor:
    """The Wikipedia articles, joined by blank lines, as one token stream (the held-out text
    is its start; training recipes use what follows token 32,768)."""
    from .data import wikipedia_articles

    return tokenizer("\n\n".join(a["text"] for a in wikipedia_articles()), return_tensors="pt").input_ids[0]


TRAIN_START = 32768  # training text starts here: the perplexity recipes score only tokens before it


def wikipedia_lm_splits(tokenizer: Any, eval_tokens: int, seq: int) -> tuple[torch.Tensor, Any]:
    """(held-out token stream: the first ``eval_tokens`` tokens, training ``datasets.Dataset``
    of ``seq``-token blocks from token ``TRAIN_START`` on)."""
    from datasets import Dataset

    ids = wikipedia_ids(tokenizer)
    train = ids[TRAIN_START:]
    blocks = train[: train.numel() // seq * seq].reshape(-1, seq).tolist()
    return ids[:eval_tokens], Dataset.from_dict({"input_ids": blocks, "labels": blocks})


def run_meta() -> dict[str, str]:
    """Machine, date and command line, stamped on every result file."""
    return {"machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} "
                       f"({torch.get_num_threads()} threads)",
            "date": date.today().isoformat(), "command": _command()}


def _command() -> str:
    """The command line as typed: ``hf-rbe compare``, or ``python recipes/x.py --flag``."""
    prog = Path(sys.argv[0]).name if sys.argv else ""
    if prog == "hf-rbe":
        return " ".join(["hf-rbe", *sys.argv[1:]])
    return "python " + " ".join(sys.argv)


def write_results(out: str | Path, meta: dict[str, str], rows: list[dict], markdown: str) -> None:
    """``out``.json (meta + rows) and ``out``.md (the table a README quotes)."""
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    path.with_suffix(".md").write_text(markdown)
