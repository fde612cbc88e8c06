"""The training precisions, one table: Lightning's name → what it computes in and whether it scales the loss."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Precision:
    compute: str  # the dtype matmuls run in: "bfloat16", "float16" or "float32"
    autocast: bool  # mixed: float32 weights, matmuls under autocast in `compute`
    loss_scaling: bool  # a GradScaler scales the loss; it skips non-finite steps itself


PRECISIONS = {
    "bf16-mixed": Precision("bfloat16", autocast=True, loss_scaling=False),
    "16-mixed": Precision("float16", autocast=True, loss_scaling=True),
    "32-true": Precision("float32", autocast=False, loss_scaling=False),
    "bf16-true": Precision("bfloat16", autocast=False, loss_scaling=False),
}


def compute_dtype(precision: str):
    import torch

    return getattr(torch, PRECISIONS[precision].compute)


def autocast_dtype(precision: str):
    """The dtype autocast runs in, or None for a precision without autocast."""
    return compute_dtype(precision) if PRECISIONS[precision].autocast else None
