"""The residual stream in the autocast dtype (fast.low_precision_residual), as llm.c keeps it.

Under autocast the embeddings are float32, so every block's adds and norms read and write float32. Cast to
bf16 before the first block, the stream and its gradient stay bf16: half the memory traffic of the norms
and adds."""

from __future__ import annotations

import torch

from ..model import GPT
from .head_loss import compute_dtype


def _cast_input(block: torch.nn.Module, args: tuple) -> tuple:
    x, *rest = args
    return (x.to(compute_dtype(x)), *rest)


def use_low_precision_residual(model: GPT) -> None:
    model.blocks[0].register_forward_pre_hook(_cast_input)
