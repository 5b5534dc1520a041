"""``quantize_checkpoint``: a checkpoint on disk into an RBE checkpoint, in bounded memory, resumable.

For models larger than the machine's memory. transformers builds the model and loads what is not
converted (embeddings, norms, heads); the blocks' Linear weights stay on the meta device and are
read from the source's safetensors shards one block at a time while each is calibrated (or encoded)
and packed (``hf.quantizer``, ``hf.calibration``). Every finished block is saved in a work directory
inside ``out``, so a run that stops (a kill, a full disk, a reboot) resumes from its last finished
block when started again with the same arguments; the output is written as sharded safetensors
with ``save_pretrained`` and is an ordinary RBE checkpoint, the same bit for bit as
``from_pretrained(src, quantization_config=config)`` followed by ``save_pretrained`` gives.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from ..core.errors import ConfigError
from .atomic import resolve_target
from .config import RBEConfig

logger = logging.getLogger(__name__)

#: The work directory inside the output directory while a run is in progress.
WORK_DIR = ".rbe-calibration"


def _auto_class(src: str | Path) -> Any:
    """The transformers Auto class for ``src``: a causal LM's, else the bare model's."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    archs = AutoConfig.from_pretrained(src).architectures or []
    return AutoModelForCausalLM if any(a.endswith("ForCausalLM") for a in archs) else AutoModel


def quantize_checkpoint(src: str | Path, out: str | Path, config: RBEConfig, *, dtype: Any = None,
                        tokenizer: Any = None, max_shard_size: str | int = "2GB", keep_work_dir: bool = False,
                        **from_pretrained: Any) -> Path:
    """Quantize the checkpoint ``src`` (a directory or Hub name of safetensors weights) with ``config``
    and save the RBE checkpoint in ``out`` (module docstring); returns ``out``.

    Calibration (``config.dataset``) reads one block's float weights at a time and resumes from
    ``out/.rbe-calibration`` (or ``config.calibration_work_dir``) when a previous run with the same
    arguments stopped; the work directory is removed at the end unless ``keep_work_dir``. ``dtype``
    and the other keyword arguments go to ``from_pretrained``; the tokenizer (``tokenizer``, else
    ``config.tokenizer``, else the source's, when it has one) calibrates and is saved beside the weights."""
    resolve_target(out)  # refuses '' (the current directory) and a file
    out = Path(out)
    if Path(src).exists() and out.resolve() == Path(src).resolve():
        raise ConfigError(f"the output {out} is the source checkpoint: choose another directory")
    config = config.copy()
    if tokenizer is not None and config.tokenizer is None:
        config.tokenizer = tokenizer  # calibration reads its text with it too
    work = Path(config.calibration_work_dir) if config.calibration_work_dir else out / WORK_DIR
    if config.dataset is not None:
        config.calibration_work_dir = str(work)
    model = _auto_class(src).from_pretrained(src, quantization_config=config, dtype=dtype, **from_pretrained)
    model.save_pretrained(out, max_shard_size=max_shard_size)
    _save_tokenizer(src, out, tokenizer or config.tokenizer)
    if not keep_work_dir and work.exists():
        shutil.rmtree(work)
    logger.info("saved the RBE checkpoint in %s", out)
    return out


def _save_tokenizer(src: str | Path, out: Path, tokenizer: Any) -> None:
    """Save the tokenizer beside the weights when it can be saved (a transformers tokenizer)."""
    if tokenizer is None or isinstance(tokenizer, str):
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(tokenizer or src)
        except (OSError, ValueError):  # a checkpoint without a tokenizer: weights only
            return
    if not hasattr(tokenizer, "save_pretrained"):
        logger.warning("the tokenizer %s has no save_pretrained; the checkpoint is saved without it",
                       type(tokenizer).__name__)
        return
    tokenizer.save_pretrained(out)
