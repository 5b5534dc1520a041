"""Run one model in vLLM, in a process of its own, and print what it computed as one JSON line
(the vLLM tests, bench/vllm_parity.py and bench/vllm_speed.py compare it with transformers + hf-rbe).

    python bench/vllm_run.py MODEL_DIR REQUEST.json

REQUEST (every key optional but ``prompts``)::

    prompts          [[token ids]]: greedy continuations of ``max_tokens`` tokens ("tokens")
    prompt_logprobs  also the log-probability of each prompt token after the first ("prompt_logprobs")
    score            [[token ids]]: only those log-probabilities, for long windows ("score_logprobs")
    speed            {"batches": [1, 8], "prompt_len": 128, "new_tokens": 64}: decoding tokens/s per
                     batch size (n tokens less 1, as hf_rbe.evaluation.measure.decode_speed) and the
                     time to the first token of one prompt ("speed")
    dtype, tp, max_model_len, kv_cache_bytes

Also prints the bytes of the model's weights and buffers in the first worker ("weight_bytes"),
the CPUs and threads that worker computes with ("worker_threads") and the load time. Output: one
line ``RESULT {json}``.
"""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def run(model: Path, request: dict) -> dict:
    """What this script computes for ``request`` on ``model``, from a vLLM process of its own (the
    benches' one way to reach vLLM)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(request, f)
    res = subprocess.run([sys.executable, __file__, str(model), f.name], capture_output=True, text=True, env=env)
    os.unlink(f.name)
    lines = [line for line in res.stdout.splitlines() if line.startswith("RESULT ")]
    if res.returncode or not lines:
        raise SystemExit(f"vLLM failed on {model}:\n{(res.stdout + res.stderr)[-6000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def _speed(llm, spec):
    from vllm import SamplingParams

    prompt = [(7 * i) % 30000 + 100 for i in range(spec.get("prompt_len", 128))]
    first = SamplingParams(max_tokens=1, temperature=0.0)
    llm.generate([{"prompt_token_ids": [t + 1 for t in prompt]}], first, use_tqdm=False)  # warm-up (no cache hit)
    t0 = time.perf_counter()
    llm.generate([{"prompt_token_ids": prompt}], first, use_tqdm=False)
    out = {"ttft_s": time.perf_counter() - t0, "decode_tokens_per_s": {}}
    n = spec.get("new_tokens", 64)

    def timed(prompts, tokens):
        t0 = time.perf_counter()
        llm.generate(prompts, SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True), use_tqdm=False)
        return time.perf_counter() - t0

    for b in spec.get("batches", [1]):
        # distinct prompts (no prefix-cache hits); decoding alone: generating n tokens less generating 1
        prompts = [{"prompt_token_ids": [(t + 101 * j) % 30000 + 100 for t in prompt]} for j in range(b)]
        timed(prompts, 2)  # warm-up
        one, many = timed(prompts, 1), timed(prompts, n)
        out["decode_tokens_per_s"][str(b)] = b * (n - 1) / (many - one)
    return out


if __name__ == "__main__":  # vLLM spawns workers that import this file
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # weight_bytes goes to the workers pickled
    from vllm import LLM, SamplingParams

    from hf_rbe.serving.vllm import weight_bytes, worker_threads

    model, request = sys.argv[1], json.loads(open(sys.argv[2]).read())
    kw = {"kv_cache_memory_bytes": request["kv_cache_bytes"]} if "kv_cache_bytes" in request else {}
    t0 = time.perf_counter()
    llm = LLM(model=model, dtype=request.get("dtype", "float32"), enforce_eager=True, seed=0,
              max_model_len=request.get("max_model_len", 512), tensor_parallel_size=request.get("tp", 1), **kw)
    result = {"load_s": time.perf_counter() - t0, "weight_bytes": llm.apply_model(weight_bytes)[0],
              "worker_threads": llm.apply_model(worker_threads)[0]}
    if request.get("prompts"):
        params = SamplingParams(max_tokens=request.get("max_tokens", 16), temperature=0.0,
                                prompt_logprobs=0 if request.get("prompt_logprobs") else None)
        outs = llm.generate([{"prompt_token_ids": ids} for ids in request["prompts"]], params, use_tqdm=False)
        result["tokens"] = [list(o.outputs[0].token_ids) for o in outs]
        if request.get("prompt_logprobs"):
            result["prompt_logprobs"] = [[lp[t].logprob for t, lp in zip(ids[1:], o.prompt_logprobs[1:])]
                                         for ids, o in zip(request["prompts"], outs)]
    if request.get("score"):
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        outs = llm.generate([{"prompt_token_ids": ids} for ids in request["score"]], params, use_tqdm=False)
        result["score_logprobs"] = [[lp[t].logprob for t, lp in zip(ids[1:], o.prompt_logprobs[1:])]
                                    for ids, o in zip(request["score"], outs)]
    if request.get("speed"):
        result["speed"] = _speed(llm, request["speed"])
    print("RESULT " + json.dumps(result), flush=True)
