"""Moved to the package ``hf_rbe.hf.calibration``; this path keeps working and warns once."""

from ..core.moved import forward_to

__getattr__ = forward_to("hf_rbe.hf.calibrate", "hf_rbe.hf.calibration", {
    name: f"hf_rbe.hf.calibration.{module}" for module, names in {
        "pipeline": ("quantize_calibrated", "Calibration"),
        "windows": ("calibration_ids", "resolve_tokenizer"),
        "capture": ("find_blocks", "features", "Hessians", "first_block_inputs", "run_block", "output_head"),
        "fisher": ("fisher", "Fisher"),
        "finetune": ("finetune_block", "finetune_model", "finetune_steps", "train_continuous", "norms"),
    }.items() for name in names})
