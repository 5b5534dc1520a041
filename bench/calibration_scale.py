"""What calibrating one decoder block costs, in time and memory, from SmolLM2's width to Llama-70B's.

    python bench/calibration_scale.py                       # widths 576 2048 4096 8192 (about 15 minutes)
    python bench/calibration_scale.py --widths 576 --rows 64         # a quick look

Llama-shaped blocks with random weights (the shapes of SmolLM2-135M, Llama-3.2-1B, Llama-3.1-8B and
Llama-3.1-70B: width, MLP width, heads, KV heads), calibrated at v2-3 on Wikipedia windows (64 x 512
tokens, the defaults) with block fine-tuning and no end-to-end step (that one is measured on a real
model by the main job). Each width runs in a fresh process, so its peak resident memory is its own.

Three kinds of numbers, labelled in the table:

- **measured**: widths up to ``--full-max`` run the streaming path (``hf_rbe.quantize_checkpoint``)
  on ``--blocks`` whole blocks; each phase's seconds per block and the peak resident memory while
  it ran (``hf_rbe.evaluation.memory``).
- **projected**: wider blocks take too long for whole blocks on this CPU (at 1B width the 32
  block fine-tune steps alone run for many minutes; encoding grows with the weights). Every distinct
  layer shape is encoded on ``--rows`` of its rows with a full K x K Hessian, twice (half the rows,
  then all): the difference is the per-row part (the codeword search, the error feedback), the
  rest is the K x K part (LDLQ's factors), so a block's encode time is the K x K part plus the
  per-row part times N. The other phases (Hessians, both paths' forwards, the fine-tune) are
  matmuls and decodes over the block's weights at a fixed token count, projected from the widest
  measured width by the ratio of block parameters; peak memory adds the block's fp32 weights, its
  fp32 Hessians, both paths' activations and the largest measured layer encode peak.
- **extrapolated**: above ``--layers-max`` (at 70B width the down-projection's float64 K x K
  factors take many minutes and most of this machine's memory per encode), layers are scaled from
  the widest encoded width, layer by layer: the K x K part as K^3 in time and K^2 in memory, the
  per-row part as K.

Whole models: per-block time times the model's blocks on these cores; peak memory adds the other
blocks' codes and the layers outside the blocks (``model_memory_gib``). The H100 column is a floor
from FLOP counts at 50% of its dense TF32 peak for the matmul phases, and for the encode the
per-column LDLQ loop's kernel launches (K / 8 columns per stage, each a few dependent kernels) at
``LAUNCH_US`` each: a lower bound to compare orders of magnitude with, not a prediction.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time

import psutil
import torch

from hf_rbe.evaluation.results import run_meta, write_results

#: width -> (MLP width, attention heads, KV heads, blocks in the whole model, model it is shaped after)
SHAPES = {576: (1536, 9, 3, 30, "SmolLM2-135M"), 2048: (8192, 32, 8, 16, "Llama-3.2-1B"),
          4096: (14336, 32, 8, 32, "Llama-3.1-8B"), 8192: (28672, 64, 8, 80, "Llama-3.1-70B")}
#: width -> (vocabulary, whether the head is tied to the input embedding) of the model it is shaped after
VOCAB = {576: (49152, True), 2048: (128256, True), 4096: (128256, False), 8192: (128256, False)}
CODE_BITS = 3  # v2-3's bits per weight, the finished blocks' codes
SAMPLES, SEQLEN = 64, 512
PIPELINE_PHASES = ("hessians", "full-precision path", "encode", "block fine-tune", "propagate")
H100_TF32, H100_EFFICIENCY, LAUNCH_US, KERNELS_PER_COLUMN = 494e12, 0.5, 5.0, 12
STAGES = 2  # v2-3: an e8p plane and a vq8 plane


def block_layers(width: int) -> list[tuple[str, int, int]]:
    """(name, in K, out N) of a Llama block's Linear layers."""
    inter, heads, kv, _, _ = SHAPES[width]
    kv_dim = width // heads * kv
    return [("q_proj", width, width), ("k_proj", width, kv_dim), ("v_proj", width, kv_dim), ("o_proj", width, width),
            ("gate_proj", width, inter), ("up_proj", width, inter), ("down_proj", inter, width)]


def block_params(width: int) -> int:
    return sum(k * n for _, k, n in block_layers(width))


def _config() -> object:
    from hf_rbe import RBEConfig

    return RBEConfig.from_preset("v2-3", dataset="wikipedia", calibration_e2e_steps=0)


def run_pipeline(width: int, blocks: int) -> dict:
    """Child process: the streaming path on ``blocks`` random blocks; per-phase seconds and peaks."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    from hf_rbe import quantize_checkpoint
    from hf_rbe.data import smollm2_path
    from hf_rbe.evaluation.memory import MemoryProfile

    hf_logging.set_verbosity_error()
    inter, heads, kv, _, _ = SHAPES[width]
    tok = AutoTokenizer.from_pretrained(smollm2_path())
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=width, intermediate_size=inter, num_hidden_layers=blocks,
                      num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=SEQLEN,
                      tie_word_embeddings=True)
    with tempfile.TemporaryDirectory() as tmp:
        LlamaForCausalLM(cfg).save_pretrained(f"{tmp}/src")
        with MemoryProfile() as prof:
            t0 = time.perf_counter()
            quantize_checkpoint(f"{tmp}/src", f"{tmp}/out", _config(), tokenizer=tok)
            seconds = time.perf_counter() - t0
    phases = prof.as_dict()["phases"]
    return {"seconds_per_block": {p: phases[p]["seconds"] / blocks for p in PIPELINE_PHASES},
            "peak_mib": {p: phases[p]["peak_mib"] for p in ("blocks", *PIPELINE_PHASES)},
            "base_mib": prof.base_mib, "process_peak_mib": prof.peak_mib, "total_seconds": seconds}


def run_layers(width: int, rows: int) -> dict:
    """Child process: encode ``rows // 2`` and ``rows`` rows of every distinct layer shape against a
    full K x K Hessian; the difference is the per-row cost, the rest the K x K part."""
    from hf_rbe import RBEConfig
    from hf_rbe.evaluation.memory import MemoryProfile
    from hf_rbe.hf.replace import LayerFactory, encode_into

    def encode(k: int, r: int, h: torch.Tensor) -> None:
        lin = torch.nn.Linear(k, r, bias=False)
        encode_into(LayerFactory(RBEConfig.from_preset("v2-3"), {"l": lin}).build("l", lin), lin, "l", h, 0.01)

    encode(64, 64, torch.eye(64))  # compiles and warms what the first encode would otherwise time
    out = {}
    for k, n in sorted({(k, n) for _, k, n in block_layers(width)}):
        torch.manual_seed(0)
        x = torch.randn(512, k)
        h = x.T @ x  # rank-deficient: the damping makes it definite, as for a layer with few tokens
        del x
        timed = {}
        for r in (min(rows, n) // 2, min(rows, n)):
            with MemoryProfile() as prof:
                t0 = time.perf_counter()
                encode(k, r, h)
                timed[r] = (time.perf_counter() - t0, prof.added_mib)
        (r0, (t_0, _)), (r1, (t_1, added)) = sorted(timed.items())
        per_row = max(t_1 - t_0, 0.0) / (r1 - r0)
        out[f"{k}x{n}"] = {"rows": r1, "seconds": t_1, "per_row_seconds": per_row,
                           "fixed_seconds": max(t_1 - per_row * r1, 0.0), "added_mib": added}
    return out


def _child(mode: str, width: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--widths", str(width), "--blocks", str(args.blocks),
           "--rows", str(args.rows)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"{mode} at width {width} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def extrapolate(width: int, ref_width: int, ref_layers: dict) -> dict:
    """Layer measurements at ``width`` from those at ``ref_width``, layer by layer (same role): the
    K x K part grows as K^3 (Cholesky), its memory as K^2, the per-row part as K."""
    out = {}
    for (_, k, n), (_, k0, n0) in zip(block_layers(width), block_layers(ref_width)):
        m, f = ref_layers[f"{k0}x{n0}"], k / k0
        out[f"{k}x{n}"] = {"rows": m["rows"], "seconds": float("nan"), "per_row_seconds": m["per_row_seconds"] * f,
                           "fixed_seconds": m["fixed_seconds"] * f**3, "added_mib": m["added_mib"] * f**2}
    return out


def encode_projection(width: int, layers: dict) -> float:
    """Seconds to encode one whole block from the row-slice measurements (module docstring)."""
    total = 0.0
    for _, k, n in block_layers(width):
        m = layers[f"{k}x{n}"]
        total += m["fixed_seconds"] + m["per_row_seconds"] * n
    return total


def h100_floor(width: int) -> float:
    """Seconds per block on one H100, a floor (module docstring)."""
    tokens, params = SAMPLES * SEQLEN, block_params(width)
    distinct_k = {k for _, k, _ in block_layers(width)}
    matmul_flops = 2 * tokens * params * 3  # fp path, quantized path, Hessian-side forward
    matmul_flops += sum(2 * tokens * k * k for k in distinct_k)  # Hessian sums
    matmul_flops += 32 * 3 * 2 * 2 * SEQLEN * params  # fine-tune: 32 steps of 2 windows, forward + backward
    matmul_flops += sum(STAGES * k**3 for _, k, _ in block_layers(width))  # Cholesky + inverse per stage
    launches = sum(STAGES * (k // 8) * KERNELS_PER_COLUMN for _, k, _ in block_layers(width))
    return matmul_flops / (H100_TF32 * H100_EFFICIENCY) + launches * LAUNCH_US * 1e-6


def outside_params(width: int) -> int:
    """Parameters outside the blocks of the model ``width`` is shaped after (embeddings, an untied head)."""
    vocab, tied = VOCAB[width]
    return vocab * width * (1 if tied else 2)


def model_params(width: int) -> int:
    """Parameters of the whole model ``width`` is shaped after."""
    return SHAPES[width][3] * block_params(width) + outside_params(width)


def model_memory_gib(width: int, block_peak_mib: float, measured_blocks: int) -> float:
    """GiB the whole model's calibration holds at its peak: a block's peak, plus every other block's codes
    (finished blocks stay in memory until the checkpoint is saved) and, where the block peak was not
    measured on a loaded model, the layers outside the blocks in fp32 (embeddings, an untied head:
    transformers loads them whole). Without the end-to-end fine-tune (the main job measures it)."""
    n_blocks = SHAPES[width][3]
    outside = 0 if measured_blocks else outside_params(width) * 4
    codes = (n_blocks - max(measured_blocks, 1)) * block_params(width) * CODE_BITS / 8
    return (block_peak_mib * 2**20 + outside + codes) / 2**30


def memory_projection(width: int, layers: dict) -> float:
    """MiB one block's calibration holds at its peak, besides the process's base (module docstring)."""
    tokens = SAMPLES * SEQLEN
    acts = 3 * tokens * width * 4  # quantized path's inputs, full-precision path's, and the next outputs
    weights = block_params(width) * 4
    hessians = sum(k * k * 4 for k in {k for _, k, _ in block_layers(width)})
    encode = max(layers[f"{k}x{n}"]["added_mib"] * 2**20 + (n - layers[f"{k}x{n}"]["rows"]) * k * 4 * 4
                 for _, k, n in block_layers(width))  # measured peak + 4 N x K buffers for the other rows
    # (LDLQ's work copy and codewords, the codes, the residual)
    return (acts + weights + hessians + encode) / 2**20


def rows_for(args: argparse.Namespace) -> list[dict]:
    rows, rate = [], None  # seconds per block parameter of the non-encode phases, at the widest measured width
    for width in args.widths:
        _, _, _, n_blocks, shaped = SHAPES[width]
        if width <= args.layers_max:
            layers, kind = _child("layers", width, args), "projected"
        else:
            layers, kind = extrapolate(width, rows[-1]["width"], rows[-1]["layers"]), "extrapolated"
        row = {"width": width, "shaped_after": shaped, "blocks_in_model": n_blocks, "block_params": block_params(width),
               "layers": layers, "encode_projected_s": encode_projection(width, layers),
               "memory_projected_mib": memory_projection(width, layers), "h100_floor_s": h100_floor(width)}
        if width <= args.full_max:
            measured = _child("pipeline", width, args)
            row["measured"] = measured
            per_block = sum(measured["seconds_per_block"].values())
            rate = (per_block - measured["seconds_per_block"]["encode"]) / block_params(width)
            row.update(kind="measured", block_s=per_block, block_peak_mib=measured["peak_mib"]["blocks"],
                       base_mib=measured["base_mib"])
        else:
            other = rate * block_params(width) if rate is not None else float("nan")
            row.update(kind=kind, block_s=row["encode_projected_s"] + other,
                       block_peak_mib=row["memory_projected_mib"] + (rows[0]["base_mib"] if rows else 0.0),
                       base_mib=rows[0]["base_mib"] if rows else float("nan"))
        row["model_hours"] = row["block_s"] * n_blocks / 3600
        row["h100_model_minutes_floor"] = row["h100_floor_s"] * n_blocks / 60
        row["model_params"] = model_params(width)
        row["model_peak_gib"] = model_memory_gib(width, row["block_peak_mib"],
                                                 args.blocks if row["kind"] == "measured" else 0)
        rows.append(row)
        print(_line(row), flush=True)
    return rows


def _line(r: dict) -> str:
    return (f"{r['width']:>5} ({r['shaped_after']}) {r['kind']}: {r['block_s']:.0f} s/block, peak "
            f"{r['block_peak_mib']:.0f} MiB; model {r['model_hours']:.1f} h and {r['model_peak_gib']:.1f} GiB here, "
            f"H100 floor {r['h100_model_minutes_floor']:.2f} min")


def table(rows: list[dict], meta: dict) -> str:
    lines = [f"`{meta['command']}` on {meta['machine']}, {meta['date']} (load average {meta['load_average']}): "
             f"v2-3 calibration on {SAMPLES} x {SEQLEN} Wikipedia tokens, random Llama-shaped blocks.", "",
             "| width | shaped after | kind | s / block | of which encode | block peak RSS MiB | blocks "
             "| whole model here, h | whole model peak, GiB | H100 floor, min |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        enc = r["measured"]["seconds_per_block"]["encode"] if r["kind"] == "measured" else r["encode_projected_s"]
        lines.append(f"| {r['width']} | {r['shaped_after']} | {r['kind']} | {r['block_s']:.0f} | {enc:.0f} | "
                     f"{r['block_peak_mib']:.0f} | {r['blocks_in_model']} | {r['model_hours']:.1f} | "
                     f"{r['model_peak_gib']:.1f} | {r['h100_model_minutes_floor']:.2f} |")
    measured = [r for r in rows if r["kind"] == "measured"]
    if measured:
        lines += ["", "Measured phases, seconds per block (peak RSS MiB while the phase ran):", "",
                  "| width | " + " | ".join(PIPELINE_PHASES) + " |", "|---|" + "---|" * len(PIPELINE_PHASES)]
        for r in measured:
            m = r["measured"]
            lines.append(f"| {r['width']} | " + " | ".join(
                f"{m['seconds_per_block'][p]:.1f} ({m['peak_mib'][p]:.0f})" for p in PIPELINE_PHASES) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--widths", type=int, nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--blocks", type=int, default=1, help="whole blocks per measured width")
    ap.add_argument("--full-max", type=int, default=576, help="the widest width run as whole blocks")
    ap.add_argument("--rows", type=int, default=256, help="rows of each layer encoded for the projection")
    ap.add_argument("--layers-max", type=int, default=4096,
                    help="the widest width whose layers are encoded; wider ones are extrapolated from it")
    ap.add_argument("--out", default="results/calibration_scale")
    ap.add_argument("--child", choices=("pipeline", "layers"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        width = args.widths[0]
        res = run_pipeline(width, args.blocks) if args.child == "pipeline" else run_layers(width, args.rows)
        print(json.dumps(res))
        return
    meta = {**run_meta(), "total_memory_gib": f"{psutil.virtual_memory().total / 2**30:.1f}"}
    rows = rows_for(args)
    md = table(rows, meta)
    write_results(args.out, meta, rows, md)
    print(md)


if __name__ == "__main__":
    main()
