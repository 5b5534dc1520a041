"""Distillation from the unquantized model: a ``Trainer`` whose loss adds the teacher's logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Trainer


class DistillTrainer(Trainer):
    """``Trainer`` whose loss adds KL(teacher || student) on the logits (temperature ``T``)."""

    def __init__(self, *args, teacher: nn.Module, alpha: float = 0.5, temperature: float = 1.0, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.alpha, self.temperature = alpha, temperature

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):  # type: ignore[no-untyped-def, override]
        out = model(**inputs)
        with torch.no_grad():
            t_logits = self.teacher(**{k: v for k, v in inputs.items() if k != "labels"}).logits
        t = self.temperature
        kd = F.kl_div(F.log_softmax(out.logits / t, -1), F.log_softmax(t_logits / t, -1), log_target=True,
                      reduction="batchmean") * t * t / out.logits.shape[1]
        loss = (1 - self.alpha) * out.loss + self.alpha * kd
        return (loss, out) if return_outputs else loss
