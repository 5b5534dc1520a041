"""What a checkpoint that verifies itself costs: hashing at save, header reads and hashing at load.

    python bench/integrity_cost.py                          # writes runs/integrity_cost.{json,md}
    python bench/integrity_cost.py --out results/integrity_cost

SmolLM2-135M is quantized on load (calibration-free, ``--preset``, embeddings in bf16) and saved
once; then, best of ``--repeats``: building the record written into the safetensors metadata
(``integrity.record``: one SHA-256 per packed layer), the load-time check alone (``Checkpoint.read``
of the headers + ``verify``), and a whole plain ``from_pretrained`` of the checkpoint, which
includes that check. One process, nothing else running (the load average is in the JSON).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import hf_rbe  # noqa: E402,F401
from hf_rbe.data.fetch import ensure  # noqa: E402
from hf_rbe.evaluation.results import run_meta, write_results  # noqa: E402
from hf_rbe.hf.config import RBEConfig  # noqa: E402
from hf_rbe.hf.integrity import Checkpoint, record, verify  # noqa: E402


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="v2-3")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="runs/integrity_cost")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    path = str(ensure("smollm2")["smollm2"])
    config = RBEConfig.from_preset(args.preset, embedding_dtype="bfloat16")
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=config)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        files = sorted(str(p) for p in Path(tmp).glob("*.safetensors"))
        stored = sum(t.numel() * t.element_size() for n, m in model.named_modules() if hasattr(m, "stored_tensors")
                     for t in (getattr(m, k) for k in m.stored_tensors()))
        loaded = AutoModelForCausalLM.from_pretrained(tmp)
        save_s = _best(lambda: record(model), args.repeats)
        check_s = _best(lambda: verify(loaded, Checkpoint.read(files)), args.repeats)
        load_s = _best(lambda: AutoModelForCausalLM.from_pretrained(tmp), args.repeats)
        file_mib = sum(Path(f).stat().st_size for f in files) / 2**20
    row = {"model": "SmolLM2-135M", "setting": args.preset, "checkpoint_mib": round(file_mib, 1),
           "hashed_mib": round(stored / 2**20, 1), "record_at_save_ms": round(save_s * 1e3, 1),
           "check_at_load_ms": round(check_s * 1e3, 1), "from_pretrained_s": round(load_s, 2),
           "check_share_of_load": round(check_s / load_s, 3)}
    meta = run_meta()
    md = (f"`{meta['command']}` on {meta['machine']}, {meta['date']} (load average {meta['load_average']})\n\n"
          "| model | setting | checkpoint MiB | hashed MiB | record at save ms | check at load ms | "
          "from_pretrained s | check share of load |\n|---|---|---|---|---|---|---|---|\n"
          f"| {row['model']} | {row['setting']} | {row['checkpoint_mib']} | {row['hashed_mib']} | "
          f"{row['record_at_save_ms']} | {row['check_at_load_ms']} | {row['from_pretrained_s']} | "
          f"{row['check_share_of_load']:.1%} |\n")
    write_results(args.out, meta, [row], md)
    print(md)


if __name__ == "__main__":
    main()
