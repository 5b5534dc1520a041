"""``hf-rbe compare``: RBE next to the quantizers users already know, same models, same data.

    methods   the rows: fp32, RBE presets, seed64, HQQ, optimum-quanto, bitsandbytes, GPTQ, AutoRound
    peers     the calibrated peers through their libraries, sized from their packed checkpoints
    run       measuring them: perplexity, embedding cosine, probe accuracy, sizes, memory, time
    report    acceptance targets, markdown table, Pareto plot (redrawn from the JSON)
"""

from .report import render
from .run import run

__all__ = ["render", "run"]
