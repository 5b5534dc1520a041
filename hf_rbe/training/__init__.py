"""Training RBE models with ``Trainer``: QAT (the layer itself is ``hf_rbe.core.qat``), its
callbacks, distillation from the unquantized model, and merging LoRA adapters into codes.

    callbacks   ReencodeCallback, TimeBudgetCallback
    distill     DistillTrainer
    lora        merge_and_unload for PEFT models on RBE layers
"""

from ..core.qat import (
                        RBEQATLinear,
                        TrainableTables,
                        freeze,
                        prepare_qat,
                        quantizer_parameters,
                        reencode,
                        straight_through,
)
from .callbacks import ReencodeCallback, TimeBudgetCallback
from .distill import DistillTrainer
from .lora import merge_and_unload

__all__ = ["DistillTrainer", "RBEQATLinear", "ReencodeCallback", "TimeBudgetCallback", "TrainableTables", "freeze",
           "merge_and_unload", "prepare_qat", "quantizer_parameters", "reencode", "straight_through"]
