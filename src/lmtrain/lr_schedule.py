"""Warmup + cosine learning-rate schedule: the lesson's `get_lr`, as a pure function and as a LambdaLR."""

from __future__ import annotations

import math
from functools import partial


def get_lr(step: int, *, warmup_steps: int, max_steps: int, max_lr: float, min_lr: float) -> float:
    """Learning rate before optimizer step `step` (0-based)."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step > max_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr + 0.5 * (max_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def lr_factor(step: int, *, warmup_steps: int, max_steps: int, max_lr: float, min_lr: float) -> float:
    """`get_lr` relative to max_lr: LambdaLR multiplies each param group's base lr by it."""
    return get_lr(step, warmup_steps=warmup_steps, max_steps=max_steps, max_lr=max_lr, min_lr=min_lr) / max_lr


def warmup_cosine(optimizer, *, warmup_steps: int, max_steps: int, max_lr: float, min_lr: float):
    """A LambdaLR stepped once per optimizer step; each group's base lr must be its peak lr."""
    from torch.optim.lr_scheduler import LambdaLR

    factor = partial(lr_factor, warmup_steps=warmup_steps, max_steps=max_steps, max_lr=max_lr, min_lr=min_lr)
    return LambdaLR(optimizer, factor)
