"""The speed wing: faster implementations of the same math, applied from outside to a plain model and module.

`apply` reads the `fast` config group. Pieces that change the built model swap a faster form in at once
(attention, MLP, residual stream, head loss, decoding, compiled blocks); pieces that act while training
runs (weight copies, the compiled loss, CUDA graphs) come back as one callback, FastTraining.
"""

from __future__ import annotations

from .attention import use_fused_qk_norm_rope
from .compile import compile_blocks
from .cuda_graphs import use_decode_graphs
from .head_loss import head_loss
from .mlp import use_fused_mlp
from .residual import use_low_precision_residual
from .training import FastTraining


def apply(module, config, precision: str) -> list:
    """Swap the configured pieces into `module` (a LanguageModel) and its GPT; the callbacks that train them."""
    model = module.model
    if config.fused_qk_norm_rope:
        use_fused_qk_norm_rope(model)
    if config.fused_mlp:
        use_fused_mlp(model)
    if config.low_precision_residual:
        use_low_precision_residual(model)
    if config.decode_graphs:
        use_decode_graphs(model)
    module.train_loss = module.eval_loss = head_loss(model, config.loss, config.loss_chunk_rows)
    if config.compile and config.compile_scope == "blocks":
        compile_blocks(model, config.compile_mode)
    return [FastTraining(config, precision)]
