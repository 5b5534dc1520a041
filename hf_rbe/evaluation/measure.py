"""Quality measurements shared by the recipes, the benchmarks and the CLI: perplexity and
sentence embeddings.

Each function states what it measured (context, stride, token count) in what it returns,
so a number can never be quoted without its conditions.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm


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
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits
        tgt = labels[:, 1:].to(device)  # position t predicts token t+1
        keep = tgt != -100
        # one row at a time: a batch's log-probabilities over a large vocabulary are as big as its logits
        nll = [float((-torch.log_softmax(logits[r, :-1].float(), dim=-1).gather(-1, tgt[r].clamp_min(0)[:, None])
                      .squeeze(-1).double() * keep[r]).sum()) for r in range(len(chunk))]
        del logits  # before the next batch's forward
        metric.add_batch(predictions=nll, references=keep.sum(1).tolist())
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


@dataclass
class DecodeSpeed:
    tokens_per_second: float
    prompt_tokens: int
    new_tokens: int
    repeats: int
    threads: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.inference_mode()
def decode_speed(model: nn.Module, prompt_tokens: int = 16, new_tokens: int = 32, repeats: int = 3) -> DecodeSpeed:
    """Greedy batch-1 decoding speed of a causal LM: ``(N - 1) / (t(generate N) - t(generate 1))``.

    Subtracting a one-token generation removes the prompt's prefill and generate's set-up, so
    what is left is the per-token cost of decoding. Medians of ``repeats``; one warm-up each
    (kernels compile or load from cache on the first call). The prompt is fixed random ids.
    """
    if new_tokens < 2:
        raise ValueError(f"new_tokens must be >= 2, got {new_tokens}")
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.config.vocab_size, (1, prompt_tokens), generator=g).to(device)

    def run(n: int) -> float:
        t0 = time.perf_counter()
        model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                       do_sample=False, pad_token_id=0)
        return time.perf_counter() - t0

    run(1), run(new_tokens)
    one = sorted(run(1) for _ in range(repeats))[repeats // 2]
    many = sorted(run(new_tokens) for _ in range(repeats))[repeats // 2]
    return DecodeSpeed((new_tokens - 1) / (many - one), prompt_tokens, new_tokens, repeats, torch.get_num_threads())
