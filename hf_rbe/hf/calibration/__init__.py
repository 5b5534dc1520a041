"""Calibrated encoding: the codes minimise each layer's output error on calibration text.

    windows     calibration text into token windows (held-out text excluded)
    capture     running parts of a model on the windows; block inputs, Hessians, features
    fisher      the Fisher pass: per-token weights and per-layer sensitivities
    allocate    bit allocation: code planes per layer for a bit budget (``target_bits``)
    finetune    fine-tuning scales, biases and norms with the codes fixed (per block, end to end)
    codes       code steps: moving a block's codes along the gradient of its loss, between fine-tune steps
    latent      straight-through latent weights: end-to-end training that moves codes (QAT from the calibrated codes)
    pipeline    ``quantize_calibrated``: the steps above in order, block by block
    phases      named phases of a run, for accounting its time and memory
    weights     where a block's float weights come from (the model, or the checkpoint) and go
    heap        handing freed heap memory back to the operating system at block boundaries
    work        a run's progress on disk, so a stopped run resumes from its last finished block

The LDLQ maths itself is plain torch: ``hf_rbe.core.ldlq``.
"""

from .pipeline import Calibration, quantize_calibrated

__all__ = ["Calibration", "quantize_calibrated"]
