"""Optimizers: AdamW with weight decay on matrices only (nanoGPT's grouping)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn


@dataclass
class OptimConfig:
    name: str = "adamw"
    max_lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 200
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.1
    eps: float = 1e-8
    fused: bool | None = None  # None: fused on CUDA where the precision allows it, else foreach


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay the ≥2-D weights (matmuls, embeddings); not biases and norm gains."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"name": "decay", "params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"name": "no_decay", "params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, config: OptimConfig, fused: bool) -> torch.optim.Optimizer:
    return torch.optim.AdamW(
        param_groups(model, config.weight_decay),
        lr=config.max_lr,
        betas=tuple(config.betas),
        eps=config.eps,
        fused=fused or None,
        foreach=None if fused else True,
    )
