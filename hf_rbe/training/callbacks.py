"""Trainer callbacks for QAT: refresh the codes every few steps; stop after a time budget."""

from __future__ import annotations

import logging
import time

from transformers import TrainerCallback

from ..core.qat import reencode

logger = logging.getLogger(__name__)


class ReencodeCallback(TrainerCallback):
    """Refresh the codes from the latent weights every ``every`` optimizer steps."""

    def __init__(self, every: int = 10) -> None:
        self.every = every

    def on_step_end(self, args, state, control, model=None, **kwargs):  # type: ignore[no-untyped-def]
        if model is not None and state.global_step % self.every == 0:
            logger.info("re-encoded %d layers at step %d", reencode(model), state.global_step)
        return control


class TimeBudgetCallback(TrainerCallback):
    """Stop training once ``minutes`` of wall time have passed (budgets are stated in minutes)."""

    def __init__(self, minutes: float) -> None:
        self.seconds = minutes * 60
        self.start: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        self.start = time.perf_counter()
        return control

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if self.start is not None and time.perf_counter() - self.start > self.seconds:
            control.should_training_stop = True
        return control
