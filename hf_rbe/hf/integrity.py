"""A checkpoint that describes and verifies itself.

Saving writes one record into every safetensors file's metadata (key ``hf_rbe``): for each
packed layer, the layout its decoder needs (``layer.layout()``: format, shape, field widths or
planes, group sizes, rotation and its block, residual) and a SHA-256 of its stored tensors
(codes, scales, seeds, tables; names, dtypes and shapes included). Loading checks, before any
value is used:

- the files are safetensors (an RBE checkpoint is never unpickled);
- every tensor a packed layer stores is present with exactly its dtype and shape, and the
  checkpoint holds no other tensor under that layer (read from the file headers, so a cast done
  while loading cannot hide a wrong dtype);
- with a record: the layer the config builds has the recorded layout (a config.json edit that
  changes decoding is refused), and the loaded tensors hash to the recorded value (any change to
  stored values, in range or not, is refused).

A checkpoint written before the record existed gets the header checks and a log line. The record
guards against corruption and hand edits, not against someone who rewrites it on purpose.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ..core.errors import CheckpointError
from ..core.packed import PackedLinear

logger = logging.getLogger(__name__)

METADATA_KEY = "hf_rbe"
RECORD_VERSION = 1

# safetensors header dtype names of the dtypes packed layers store.
_ST_DTYPES = {torch.int8: "I8", torch.uint8: "U8", torch.int16: "I16", torch.int32: "I32", torch.int64: "I64",
              torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64",
              torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}


def _own_packed(model: nn.Module) -> list[tuple[str, PackedLinear]]:
    """Every packed layer, nested ones (a seed64 layer's residual) included, by module name."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, PackedLinear)]


def _stored(layer: PackedLinear) -> dict[str, torch.Tensor]:
    """The layer's own stored tensors (its checkpoint entries, bias and children aside)."""
    return {name: getattr(layer, name) for name in layer.stored_tensors()}


def digest(layer: PackedLinear) -> str:
    """SHA-256 over the layer's stored tensors (:func:`digest_tensors`)."""
    return digest_tensors(_stored(layer))


def digest_tensors(named: dict[str, torch.Tensor]) -> str:
    """SHA-256 over a layer's stored tensors in name order: name, dtype, shape, then the bytes
    (what the record holds for each layer; a serving engine checks the tensors it loads with it)."""
    h = hashlib.sha256()
    for name, t in sorted(named.items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{_ST_DTYPES.get(t.dtype, str(t.dtype))}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def record(model: nn.Module) -> dict[str, str]:
    """safetensors metadata for ``model``'s checkpoint: ``{"hf_rbe": json}`` (empty without packed layers)."""
    layers = {name: {"layout": m.layout(), "sha256": digest(m)} for name, m in _own_packed(model)}
    if not layers:
        return {}
    return {METADATA_KEY: json.dumps({"version": RECORD_VERSION, "layers": layers}, separators=(",", ":"))}


@dataclass
class Checkpoint:
    """What the files of a checkpoint say before any tensor is read: dtype and shape of every
    tensor (from the headers), the file that holds it, and the hf-rbe record, if one was written."""

    headers: dict[str, tuple[str, tuple[int, ...]]]
    layers: dict[str, dict] | None
    files: dict[str, str]  # tensor name -> the safetensors file holding it

    @classmethod
    def read(cls, files: Iterable[str | Path]) -> Checkpoint:
        headers: dict[str, tuple[str, tuple[int, ...]]] = {}
        where: dict[str, str] = {}
        layers: dict[str, dict] | None = None
        for f in files:
            if not str(f).endswith(".safetensors"):
                raise CheckpointError(f"{f}: hf-rbe reads safetensors checkpoints only (other formats are pickles, "
                                      "which it never loads); save the model with save_pretrained to get safetensors")
            with safe_open(str(f), framework="pt") as st:
                for key in st.keys():
                    sl = st.get_slice(key)
                    headers[key] = (sl.get_dtype(), tuple(sl.get_shape()))
                    where[key] = str(f)
                meta = (st.metadata() or {}).get(METADATA_KEY)
            if meta is not None:
                try:
                    parsed = json.loads(meta)
                    part = parsed["layers"]
                    if parsed.get("version") != RECORD_VERSION or not isinstance(part, dict):
                        raise ValueError(f"record version {parsed.get('version')!r}")
                except (ValueError, KeyError, TypeError, RecursionError) as err:  # RecursionError: nested too deep
                    raise CheckpointError(f"{f}: unreadable hf-rbe record in the safetensors metadata ({err}); "
                                          "tampered checkpoint?") from err
                layers = {**(layers or {}), **part}
        return cls(headers, layers, where)


def _resolve(name: str, modules: dict[str, set[str]], prefix: str) -> str:
    """The checkpoint's name for module ``name`` (transformers adds or strips the base model's prefix
    when a head model and its base model load each other's checkpoints)."""
    for c in (name, f"{prefix}.{name}", name.removeprefix(f"{prefix}.")) if prefix else (name,):
        if c in modules:
            return c
    return name


def verify(model: nn.Module, checkpoint: Checkpoint) -> None:
    """Refuse (CheckpointError) a loaded model whose packed layers do not match ``checkpoint`` exactly."""
    modules: dict[str, set[str]] = defaultdict(set)  # module name -> the tensor names the checkpoint holds for it
    for key in checkpoint.headers:
        module, _, tensor = key.rpartition(".")
        modules[module].add(tensor)
    prefix = getattr(model, "base_model_prefix", "") or ""
    packed = _own_packed(model)
    if checkpoint.layers is None:
        logger.warning("hf-rbe: this checkpoint has no hf-rbe record (written by an older hf-rbe): its tensors' "
                       "dtypes and shapes are checked, its layout and values cannot be; save it again to add one")
    elif len(checkpoint.layers) != len(packed):
        raise CheckpointError(f"the config builds {len(packed)} packed layers, the checkpoint records "
                              f"{len(checkpoint.layers)}: config.json does not match the weights "
                              "(tampered checkpoint?)")
    for name, layer in packed:
        where = _resolve(name, modules, prefix)
        expected = layer.stored_tensors()
        for t, spec in expected.items():
            if t not in modules.get(where, ()):
                raise CheckpointError(f"{where}: the checkpoint lacks '{t}' (truncated or tampered checkpoint, or a "
                                      "config.json that does not match the weights)")
            dtype, shape = checkpoint.headers[f"{where}.{t}"]
            if dtype != _ST_DTYPES.get(spec.dtype) or shape != spec.shape:
                raise CheckpointError(f"{where}: '{t}' is stored as {dtype} {list(shape)}, the format needs "
                                      f"{_ST_DTYPES.get(spec.dtype)} {list(spec.shape)} (tampered checkpoint?)")
        extra = sorted(modules.get(where, set()) - set(expected) - {"bias"})
        if extra:
            raise CheckpointError(f"{where}: the checkpoint holds {extra[:3]}, which this layer's format does not "
                                  "store: config.json does not match the weights (tampered checkpoint?)")
        if checkpoint.layers is None:
            continue
        rec = checkpoint.layers.get(where) or checkpoint.layers.get(name)
        if not isinstance(rec, dict):
            raise CheckpointError(f"{where}: not in the checkpoint's hf-rbe record (tampered checkpoint?)")
        if rec.get("layout") != layer.layout():
            raise CheckpointError(f"{where}: config.json builds layout {layer.layout()}, the weights were written with "
                                  f"{rec.get('layout')}: config.json was edited (restore it)")
        if rec.get("sha256") != digest(layer):
            raise CheckpointError(f"{where}: stored tensors do not match the checksum written with them "
                                  "(corrupted or tampered checkpoint)")
