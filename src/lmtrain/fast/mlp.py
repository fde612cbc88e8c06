"""The MLP's activation fused with its neighbours (fast.fused_mlp): ReLU² as one autograd function, and GPT-2's
tanh GELU inside cuBLASLt's matmul epilogues on a GPU."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..model import GPT, MLP
from .head_loss import compute_dtype


class _ReLUSquared(torch.autograd.Function):
    """relu(x)² with the backward 2·relu(x)·grad from the saved relu(x): two kernels where autograd's graph of
    relu and a product takes four."""

    @staticmethod
    def forward(ctx, x):
        r = F.relu(x)
        ctx.save_for_backward(r)
        return r * r

    @staticmethod
    def backward(ctx, grad):
        (r,) = ctx.saved_tensors
        return torch.mul(grad, r).mul_(2.0)


class ReLUSquaredMLP(MLP):
    def activate(self, h: torch.Tensor) -> torch.Tensor:
        return _ReLUSquared.apply(h)


class GeluEpilogueMLP(MLP):
    """fc → GELU(tanh) → proj with the GELU in cuBLASLt's GELU_AUX (forward) and DGELU (backward) epilogues, so
    neither the activation nor its gradient makes a round trip through memory: a GPU, bf16/fp16, no biases."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from . import cublaslt

        if x.is_cuda:
            dtype = compute_dtype(x)
            operands = x.to(dtype), self.fc.weight.to(dtype), self.proj.weight.to(dtype)
            if cublaslt.supported(*operands):
                return self.dropout(cublaslt.gelu_mlp(*operands))
        return super().forward(x)


def use_fused_mlp(model: GPT) -> None:
    """Swap the fused form into every MLP whose activation has one (a subclass without state of its own)."""
    config = model.config
    fused = {"relu2": ReLUSquaredMLP, "gelu_tanh": None if config.bias else GeluEpilogueMLP}.get(config.mlp)
    if fused is not None:
        for block in model.blocks:
            block.mlp.__class__ = fused
