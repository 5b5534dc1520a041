"""vLLM serves RBE checkpoints written by save_pretrained (``hf_rbe.serving.vllm``), in vLLM's own
environment (``.ci/run`` builds it; skipped where vLLM is not installed).

Each model runs in a vLLM process of its own (``bench/vllm_run.py``) on the CPU in fp32, and must
give the log-probabilities transformers + hf-rbe give for the same prompt tokens and the same
greedy continuation. Tiny random models cover every v2 plane stack (through overrides: q, k and
v of one fused layer differ), group scales, shared and per-layer tables, a bias, format v1, two
families (Llama, Qwen2) and two tensor-parallel ranks.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch

vllm = pytest.importorskip("vllm")

from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, Qwen2Config  # noqa: E402

from hf_rbe import RBEConfig  # noqa: E402
from hf_rbe.data import smollm2_path  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
RUNNER = ROOT / "bench" / "vllm_run.py"
PROMPTS = [[504, 3458, 282, 4649, 314, 253, 1345], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [9906, 29, 2, 77, 1500]]
NEW_TOKENS = 8

#: Every v2 plane stack in one model: fused q/k/v and gate/up shards with different formats.
MIXED = {"*.q_proj": {"planes": ["e8p"]}, "*.k_proj": {"planes": ["e8p", "vq4"], "group_size": 64},
         "*.v_proj": {"planes": ["e8p", "e8p"]}, "*.o_proj": {"planes": ["e8p", "e8p", "e8p"]},
         "*.gate_proj": {"planes": ["e8p", "vq8"], "group_size": 128}, "*.up_proj": {"rotation_block": 64}}


def _vllm_env(tp: int = 1) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["VLLM_CPU_KVCACHE_SPACE"] = "1"  # GiB: plenty for these prompts
    if tp > 1:
        env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(i % os.cpu_count()) for i in range(tp))
    return env


def run_vllm(model: Path, tmp_path: Path, tp: int = 1) -> tuple[dict | None, str]:
    """(what bench/vllm_run.py printed, or None when it failed; its whole output)."""
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"prompts": PROMPTS, "max_tokens": NEW_TOKENS, "prompt_logprobs": True,
                                   "tp": tp, "max_model_len": 256}))
    res = subprocess.run([sys.executable, str(RUNNER), str(model), str(request)], capture_output=True, text=True,
                         env=_vllm_env(tp), timeout=900)
    lines = [line for line in res.stdout.splitlines() if line.startswith("RESULT ")]
    output = res.stdout + res.stderr
    return (json.loads(lines[-1][len("RESULT "):]) if res.returncode == 0 and lines else None), output


def hf_reference(model_dir: Path) -> dict:
    """Log-probabilities of each prompt token and the greedy continuation, transformers + hf-rbe, fp32."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out: dict[str, list] = {"tokens": [], "prompt_logprobs": []}
    with torch.no_grad():
        for ids in PROMPTS:
            x = torch.tensor([ids])
            lp = model(x).logits.float().log_softmax(-1)[0, :-1].gather(1, x[0, 1:, None])[:, 0]
            gen = model.generate(x, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)[0, len(ids):]
            out["prompt_logprobs"].append(lp.tolist())
            out["tokens"].append(gen.tolist())
    return out


def quantized(tmp_path_factory: pytest.TempPathFactory, name: str, model_config, rbe: RBEConfig) -> Path:
    """A tiny random model of ``model_config`` quantized with ``rbe``, saved with the SmolLM2 tokenizer."""
    torch.manual_seed(0)
    src = tmp_path_factory.mktemp(f"{name}-fp")
    model = AutoModelForCausalLM.from_config(model_config)
    with torch.no_grad():  # larger weights than the default init, so greedy choices are not near-ties
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    model.save_pretrained(src)
    out = tmp_path_factory.mktemp(name)
    AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32, quantization_config=rbe).save_pretrained(out)
    AutoTokenizer.from_pretrained(smollm2_path()).save_pretrained(out)
    return out


def llama(**kw) -> LlamaConfig:
    return LlamaConfig(**{"vocab_size": 49152, "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
                          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
                          "tie_word_embeddings": True, **kw})


@pytest.fixture(scope="module")
def mixed_llama(tmp_path_factory):
    return quantized(tmp_path_factory, "llama-mixed", llama(),
                     RBEConfig.from_preset("v2-3", overrides=MIXED, embedding_dtype="bfloat16"))


def assert_served_like_transformers(model_dir: Path, tmp_path: Path, tp: int = 1) -> dict:
    """What vLLM computed, once checked against transformers + hf-rbe."""
    got, log = run_vllm(model_dir, tmp_path, tp)
    assert got is not None, log[-4000:]
    want = hf_reference(model_dir)
    for g, w in zip(got["prompt_logprobs"], want["prompt_logprobs"]):
        torch.testing.assert_close(torch.tensor(g), torch.tensor(w), rtol=0, atol=2e-3)
    assert got["tokens"] == want["tokens"]
    return got


def test_every_v2_plane_stack_in_fused_layers(mixed_llama, tmp_path):
    got = assert_served_like_transformers(mixed_llama, tmp_path)
    # the worker's CPUs and threads, as the speed bench reports them
    w = got["worker_threads"]
    assert 1 <= w["cpus"] <= os.cpu_count() and w["torch_threads"] >= 1 and w["kernel_threads"] >= 1, w


def test_qwen2_with_bias_and_per_layer_tables(tmp_path_factory, tmp_path):
    cfg = Qwen2Config(vocab_size=49152, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=False)
    model = quantized(tmp_path_factory, "qwen2", cfg, RBEConfig.from_preset("v2-3", table="per_layer"))
    assert_served_like_transformers(model, tmp_path)


def test_format_v1_through_the_reference_op(tmp_path_factory, tmp_path):
    model = quantized(tmp_path_factory, "llama-v1", llama(num_hidden_layers=1), RBEConfig.from_preset("rbe-3"))
    assert_served_like_transformers(model, tmp_path)


def test_two_tensor_parallel_ranks(tmp_path_factory, tmp_path):
    # 128-wide rotation blocks: o_proj and down_proj split their inputs over two ranks on block boundaries
    model = quantized(tmp_path_factory, "llama-tp", llama(), RBEConfig.from_preset("v2-3", rotation_block=128))
    assert_served_like_transformers(model, tmp_path, tp=2)


def test_a_split_that_cuts_rotation_blocks_is_refused(mixed_llama, tmp_path):
    got, log = run_vllm(mixed_llama, tmp_path, tp=2)
    assert got is None and "cuts the 256-wide rotation blocks" in log, log[-3000:]


def test_a_tampered_checkpoint_is_refused(mixed_llama, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "tampered"
    shutil.copytree(mixed_llama, bad)
    f = bad / "model.safetensors"
    with safe_open(str(f), "pt") as st:
        meta = st.metadata()
    tensors = load_file(f)
    tensors["model.layers.1.mlp.down_proj.weight"][0, 0] ^= 1  # one code bit
    save_file(tensors, f, metadata=meta)
    got, log = run_vllm(bad, tmp_path)
    assert got is None and "do not match the checksum" in log, log[-3000:]


@pytest.mark.parametrize("setting, message", [
    ({"quantize_embeddings": True}, "quantize_embeddings=True"),
    ({"codec": "seed64"}, "codec='seed64' checkpoints are not served"),
])
def test_what_is_not_served_is_refused_by_name(tmp_path_factory, setting, message):
    from vllm import LLM

    rbe = RBEConfig(**setting) if "codec" in setting else RBEConfig.from_preset("v2-2", **setting)
    model = quantized(tmp_path_factory, "refused", llama(num_hidden_layers=1, vocab_size=1024), rbe)
    with pytest.raises(Exception, match=message):
        LLM(model=str(model), dtype="float32", enforce_eager=True, max_model_len=128, skip_tokenizer_init=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_openai_server_answers_completions(mixed_llama):
    # `vllm serve DIR`; vllm-cpu 0.32's `vllm` command looks up the distribution "vllm" and fails before it
    # parses its arguments, so the server is started as its module (the same server, same arguments).
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(mixed_llama),
                             "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--enforce-eager",
                             "--max-model-len", "256"],
                            env=_vllm_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 600
        while True:
            assert proc.poll() is None, proc.stdout.read()[-4000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            except OSError:
                assert time.time() < deadline, "vllm serve did not come up in 10 minutes"
                time.sleep(2)
        body = json.dumps({"model": str(mixed_llama), "prompt": PROMPTS[0], "max_tokens": NEW_TOKENS,
                           "temperature": 0}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(req, timeout=120).read())
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    tok = AutoTokenizer.from_pretrained(mixed_llama)
    want = tok.decode(hf_reference(mixed_llama)["tokens"][0])
    assert answer["choices"][0]["text"] == want
