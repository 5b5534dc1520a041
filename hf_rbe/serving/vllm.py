"""vLLM serves RBE checkpoints: the ``"rbe"`` quantization method, registered in every vLLM process
through the ``vllm.general_plugins`` entry point, so ``vllm serve DIR`` and ``LLM(model=DIR)`` load
any checkpoint hf-rbe's ``save_pretrained`` wrote with no code from the user.

What each layer stores comes from the checkpoint itself: the hf-rbe record in the safetensors
metadata (``hf.integrity``) holds every packed layer's layout and checksum, so vLLM builds exactly
the layers transformers builds (per-layer planes, overrides, calibrated or not) and refuses what
does not match the record, as a transformers load does. Layers are computed by ``hf_rbe::linear``
(``core.ops``: the Triton kernels on a GPU, the CPU kernels on a CPU); this module only adapts.

vLLM fuses q/k/v and gate/up into one layer. Every RBE layer rotates its input with its own seed,
so a fused layer keeps one *shard* per source layer and applies each in turn (docs/serving.md
gives the cost). Tensor parallelism splits each shard as ``serving.sharding`` allows.
Not served: seed64 checkpoints and a coded LM head (``quantize_embeddings=True``): both are
refused when the model loads, naming the setting.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from vllm.model_executor.layers.linear import (
    LinearBase,
    LinearMethodBase,
    ReplicatedLinear,
    RowParallelLinear,
    UnquantizedLinearMethod,
)
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig, QuantizeMethodBase
from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod, VocabParallelEmbedding

from ..core import ops
from ..core.errors import CheckpointError, ConfigError
from ..core.format import FORMAT_ID as RBE_V1
from ..core.format_v2 import FORMAT_ID as RBE_V2
from ..core.format_v2 import FORMAT_VERSION
from ..core.op_layout import SIGNS, parse_rbe
from ..core.spec import TensorSpec
from ..core.stored import STORAGE_DTYPES, stored_linear
from ..hf.integrity import Checkpoint, digest_tensors
from .sharding import COLUMN, ROW, shard_layout, shard_signs, shard_tensor

QUANT_METHOD = "rbe"
_QKV = {"q": 0, "k": 1, "v": 2}


def register() -> None:
    """The entry point vLLM calls in each of its processes: make ``"rbe"`` a quantization method."""
    register_quantization_config(QUANT_METHOD)(RBEVllmConfig)


def checkpoint_files(model: str, revision: str | None = None) -> list[Path]:
    """The safetensors files of a local checkpoint directory or a Hub model (from the local cache,
    or downloaded there as vLLM itself would)."""
    path = Path(model)
    if not path.is_dir():
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(model, revision=revision, allow_patterns=["*.safetensors", "*.json"]))
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{model}: no safetensors files; hf-rbe checkpoints are safetensors (save_pretrained)")
    return files


def weight_bytes(model: nn.Module) -> int:
    """Bytes a served model's weights take, each tensor once (shared tables count once); for
    ``LLM.apply_model``, which runs it in each worker. On the CPU vLLM repacks a full-precision
    Linear's weight for oneDNN and leaves an empty parameter: such a layer counts its weight's size."""
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    for m in model.modules():
        w = getattr(m, "weight", None)
        if isinstance(getattr(m, "quant_method", None), UnquantizedLinearMethod) and w is not None and not w.numel():
            total += sum(m.output_partition_sizes) * m.input_size_per_partition * w.element_size()
    return total


def worker_threads(model: nn.Module) -> dict[str, int]:
    """The CPUs a vLLM worker may run on and the threads torch and the CPU kernels (numba) use
    there; for ``LLM.apply_model``. On the CPU vLLM binds each worker to cores of its own and sets
    its thread counts, so a served model can compute on fewer cores than the machine has."""
    import numba

    return {"cpus": len(os.sched_getaffinity(0)), "torch_threads": torch.get_num_threads(),
            "kernel_threads": numba.get_num_threads()}


class RBEVllmConfig(QuantizationConfig):
    """The checkpoint's ``quantization_config`` plus what its files record (module docstring)."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        self.config = dict(config)
        self.layers: dict[str, dict[str, Any]] = {}  # HF module name -> {"layout", "sha256", "owns_tables"}
        self.vllm_names: dict[str, str] = {}  # vLLM module name -> HF module name (identity unless mapped)
        self.tables: dict[str, dict[str, torch.Tensor]] = {}  # table key -> the shared tables, once loaded

    def get_name(self) -> str:
        return QUANT_METHOD

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 70  # what Triton needs; the CPU has no capability and is always served

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # config.json's quantization_config is enough

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> RBEVllmConfig:
        if config.get("quant_method") != QUANT_METHOD:
            raise ConfigError(f"not an RBE checkpoint: quant_method is {config.get('quant_method')!r}")
        if config.get("codec", "rbe") != "rbe":
            raise ConfigError(f"codec={config.get('codec')!r} checkpoints are not served by vLLM (their layers nest "
                              "an RBE residual in a seed64 layer); serve them with transformers, or quantize with a "
                              "v2 preset")
        if config.get("quantize_embeddings"):
            raise ConfigError("quantize_embeddings=True codes the LM head and its tied embedding with RBE, which the "
                              "vLLM plugin does not serve yet; quantize with quantize_embeddings=False (the head is "
                              "then stored in embedding_dtype) to serve with vLLM")
        version = config.get("format_version", 1)
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ConfigError(f"this checkpoint uses RBE format v{version}; this hf-rbe reads up to "
                              f"v{FORMAT_VERSION}: upgrade hf-rbe")
        return cls(config)

    def maybe_update_config(self, model_name: str, hf_config: Any = None, revision: str | None = None) -> None:
        """Read every packed layer's layout and checksum from the checkpoint's record."""
        ckpt = Checkpoint.read(checkpoint_files(model_name, revision))
        if ckpt.layers is None:
            raise CheckpointError(f"{model_name}: this checkpoint has no hf-rbe record (an older hf-rbe wrote it); "
                                  "load it with transformers and save_pretrained it again to serve it with vLLM")
        for name, rec in ckpt.layers.items():
            layout = rec.get("layout")
            if not isinstance(layout, list) or not layout or layout[0] not in (RBE_V1, RBE_V2):
                raise CheckpointError(f"{name}: the record holds layout {layout!r}, not an RBE layer's")
            spec = parse_rbe(tuple(layout))[1]
            owns = all(f"{name}.{t}" in ckpt.headers for t in spec.table_tensors())
            self.layers[name] = {"layout": layout, "sha256": rec.get("sha256"), "owns_tables": owns}
        self.vllm_names = {n: n for n in self.layers}

    def apply_vllm_mapper(self, hf_to_vllm_mapper: Any) -> None:
        self.vllm_names = {(hf_to_vllm_mapper.apply_list([n]) or [n])[0]: n for n in self.layers}

    def get_quant_method(self, layer: nn.Module, prefix: str) -> QuantizeMethodBase | None:
        if isinstance(layer, VocabParallelEmbedding):
            if self.vllm_names.get(prefix, prefix) in self.layers:
                raise ConfigError(f"{prefix} is RBE-coded (quantize_embeddings=True), which the vLLM plugin does not "
                                  "serve yet")
            storage = STORAGE_DTYPES.get(self.config.get("embedding_dtype"))
            return None if storage is None else StoredEmbeddingMethod(storage)
        if not isinstance(layer, LinearBase):
            return None
        parent, _, last = prefix.rpartition(".")
        parts = self.packed_modules_mapping.get(last, [last])
        names = [self.vllm_names.get(f"{parent}.{p}" if parent else p, f"{parent}.{p}" if parent else p)
                 for p in parts]
        coded = [n in self.layers for n in names]
        if not any(coded):
            return UnquantizedLinearMethod()  # kept in full precision by the checkpoint
        if not all(coded):
            raise CheckpointError(f"{prefix}: vLLM fuses {parts}, and only some of them are RBE-coded in this "
                                  "checkpoint; quantize all of them or none (modules_to_not_convert)")
        return RBELinearMethod(self, names)


class _Shard:
    """One source layer of a vLLM layer while it loads: its full layout, this rank's, and what
    has arrived."""

    def __init__(self, name: str, record: dict[str, Any], kind: str, rank: int, world: int) -> None:
        self.name, self.layout, self.sha256 = name, list(record["layout"]), record["sha256"]
        self.kind, self.rank, self.world = kind, rank, world
        self.local = shard_layout(self.layout, kind, rank, world, name)
        self.codec, self.spec, _, self.op_names = parse_rbe(tuple(self.layout))
        self.expected: dict[str, TensorSpec] = dict(self.spec.tensors(self.layout[1], self.layout[2]))
        self.owns_tables = record["owns_tables"]
        if self.owns_tables:
            self.expected.update(self.spec.table_tensors())
        self.full: dict[str, torch.Tensor] = {}
        self.ready: dict[str, torch.Tensor] | None = None  # this rank's tensors once all arrived and verified

    def add(self, name: str, t: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor] | None:
        """Take one loaded tensor; returns the shard's tables when this completed a table owner."""
        if name not in self.expected:
            raise CheckpointError(f"{self.name}: unexpected tensor '{name}' for this layer's format")
        self.expected[name].check(name, t, self.name)
        self.full[name] = t.detach().to("cpu", copy=True)
        if len(self.full) < len(self.expected):
            return None
        if self.sha256 is not None and digest_tensors(self.full) != self.sha256:
            raise CheckpointError(f"{self.name}: stored tensors do not match the checksum written with them "
                                  "(corrupted or tampered checkpoint)")
        self.ready = {n: shard_tensor(n, t, self.layout, self.kind, self.rank, self.world).to(device).contiguous()
                      for n, t in self.full.items()}
        self.full = {}
        return {n: self.ready[n] for n in self.spec.table_tensors()} if self.owns_tables else None

    def op_tensors(self, tables: dict[str, torch.Tensor], device: torch.device) -> list[torch.Tensor]:
        """The arguments of ``hf_rbe::linear`` for this rank, in the format's order, values checked."""
        if self.ready is None:
            missing = sorted(set(self.expected) - set(self.full))
            raise CheckpointError(f"{self.name}: the checkpoint lacks {missing} (truncated or tampered checkpoint?)")
        named = {**self.ready, **tables}
        self.codec.check(named, self.spec, self.local[2], self.name)
        if self.spec.rotation:
            seed = int(named["rotation_seed"].item())
            if seed < 0:
                raise CheckpointError(f"{self.name}: rotation_seed {seed} is negative (tampered checkpoint?)")
            named[SIGNS] = shard_signs(seed, self.layout, self.kind, self.rank, self.world).to(device)
        return [named[n] for n in self.op_names]


class RBEShardModule(nn.Module):
    """A loaded shard: its op tensors as buffers (moved with the model), computed by ``hf_rbe::linear``."""

    def __init__(self, name: str, layout: list[int], tensors: list[torch.Tensor]) -> None:
        super().__init__()
        self.name, self.layout, self.n = name, layout, len(tensors)
        for i, t in enumerate(tensors):
            self.register_buffer(f"t{i}", t, persistent=False)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return ops.call_linear(x, [getattr(self, f"t{i}") for i in range(self.n)], self.layout, bias)


class RBELinearMethod(LinearMethodBase):
    """Loads and computes one vLLM linear layer made of one or more RBE layers (``names``, in the
    order vLLM fuses them)."""

    def __init__(self, config: RBEVllmConfig, names: list[str]) -> None:
        self.config, self.names = config, names

    def create_weights(self, layer: nn.Module, input_size_per_partition: int, output_partition_sizes: list[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype, **extra: Any) -> None:
        kind = ROW if isinstance(layer, RowParallelLinear) else COLUMN
        rank, world = (0, 1) if isinstance(layer, ReplicatedLinear) else (layer.tp_rank, layer.tp_size)
        if len(output_partition_sizes) != len(self.names):
            raise ConfigError(f"{self.names}: vLLM splits this layer into {len(output_partition_sizes)} parts")
        shards = [_Shard(n, self.config.layers[n], kind, rank, world) for n in self.names]
        for s, out_p in zip(shards, output_partition_sizes):
            if s.local[1] != out_p or s.local[2] != input_size_per_partition:
                raise ConfigError(f"{s.name}: vLLM gives this rank a [{out_p}, {input_size_per_partition}] part, the "
                                  f"RBE shard is [{s.local[1]}, {s.local[2]}] (KV heads replicated over more ranks "
                                  "than there are heads are not supported)")
        layer.rbe_pending = shards
        dtypes = {n: ts.dtype for s in reversed(shards) for n, ts in s.expected.items()}
        for name, dtype in sorted(dtypes.items()):
            # A placeholder per stored tensor name: the model's loader finds it by name and hands each
            # source layer's tensor (with its shard id) to _load, which keeps it per shard.
            p = nn.Parameter(torch.empty(0, dtype=dtype), requires_grad=False)
            p.weight_loader = functools.partial(self._load, layer, name)  # type: ignore[attr-defined]
            layer.register_parameter(name, p)

    def _load(self, layer: nn.Module, name: str, param: nn.Parameter, w: torch.Tensor, shard_id: Any = None) -> None:
        """``param.weight_loader``: fused layers pass the shard id, the model's loader tags ``w`` with it."""
        shard_id = getattr(w, "shard_id", None) if shard_id is None else shard_id
        index = 0 if shard_id is None else _QKV.get(shard_id, shard_id) if isinstance(shard_id, str) else shard_id
        if not isinstance(index, int) or not 0 <= index < len(layer.rbe_pending):
            raise CheckpointError(f"{self.names}: tensor '{name}' arrived for shard {shard_id!r}")
        device = param.device
        tables = layer.rbe_pending[index].add(name, w, device)
        if tables is not None and self.config.config.get("table", "universal") == "universal":
            shard = layer.rbe_pending[index]
            self.config.tables.setdefault(shard.codec.table_key(shard.spec), tables)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        modules = []
        for s in layer.rbe_pending:
            device = getattr(layer, next(iter(s.expected))).device
            if s.owns_tables:
                tables = {n: s.ready[n] for n in s.spec.table_tensors()} if s.ready is not None else {}
            else:
                key = s.codec.table_key(s.spec)
                if key not in self.config.tables:
                    raise CheckpointError(f"{s.name}: no layer of the checkpoint stores the shared table '{key}' "
                                          "(incomplete checkpoint?)")
                tables = {n: t.to(device) for n, t in self.config.tables[key].items()}
            modules.append(RBEShardModule(s.name, s.local, s.op_tensors(tables, device)))
        for name in {n for s in layer.rbe_pending for n in s.expected}:
            delattr(layer, name)
        del layer.rbe_pending
        layer.rbe_shards = nn.ModuleList(modules)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        shards = layer.rbe_shards
        if len(shards) == 1:
            return shards[0](x, bias)
        y = torch.cat([s(x) for s in shards], dim=-1)
        return y if bias is None else y + bias


class StoredEmbeddingMethod(UnquantizedEmbeddingMethod):
    """The input embedding and output head of a checkpoint saved with ``embedding_dtype``: kept in
    that dtype, looked up and multiplied as hf-rbe does (``core.stored``), so the logits match
    transformers' and a model served in fp32 holds half the bytes for them."""

    def __init__(self, storage_dtype: torch.dtype) -> None:
        self.storage_dtype = storage_dtype

    def create_weights(self, layer: nn.Module, input_size_per_partition: int, output_partition_sizes: list[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype, **extra: Any) -> None:
        layer.rbe_compute_dtype = params_dtype
        super().create_weights(layer, input_size_per_partition, output_partition_sizes, input_size, output_size,
                               self.storage_dtype, **extra)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Nothing to repack: ``apply`` multiplies the stored weight as it is."""

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return stored_linear(x, layer.weight, bias)

    def embedding(self, layer: nn.Module, input_: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(input_, layer.weight).to(layer.rbe_compute_dtype)
