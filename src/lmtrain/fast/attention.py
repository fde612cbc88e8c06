"""QK-norm and rotary positions in one Triton kernel each way (fast.fused_qk_norm_rope)."""

from __future__ import annotations

import torch

from ..model import GPT, CausalSelfAttention


class _FusedQKNormRope(torch.autograd.Function):
    """q, k, v (3, B, T, H, D) of qkv (B, T, 3, H, D) through triton_kernels.qk_norm_rope and its backward."""

    @staticmethod
    def forward(ctx, qkv, cos, sin, norm: bool, rotate: bool):
        from .triton_kernels import qk_norm_rope

        ctx.save_for_backward(qkv, cos, sin)
        ctx.options = (norm, rotate)
        return qk_norm_rope(qkv, cos, sin, norm, rotate)

    @staticmethod
    def backward(ctx, grad):
        from .triton_kernels import qk_norm_rope_backward

        return qk_norm_rope_backward(grad, *ctx.saved_tensors, *ctx.options), None, None, None, None


def fused_qk_norm_rope(qkv: torch.Tensor, rotary, norm: bool) -> torch.Tensor:
    """q, k, v (3, B, T, H, D) of qkv (B, T, 3, H, D) through the kernel; rotary: rotary_tables' rows or None."""
    rotate = rotary is not None
    cos, sin = (t.view(qkv.size(1), -1) for t in rotary) if rotate else (qkv, qkv)  # unread if not rotating
    return _FusedQKNormRope.apply(qkv, cos, sin, norm, rotate)


class FusedQKNormRopeAttention(CausalSelfAttention):
    """The attention with its queries and keys normalised and rotated by the kernel on a GPU, outside
    torch.compile (which fuses the PyTorch ops itself); elsewhere the plain ops."""

    def queries_keys_values(self, qkv: torch.Tensor, rotary):
        if (self.qk_norm or rotary is not None) and qkv.is_cuda and not torch.compiler.is_compiling():
            return fused_qk_norm_rope(qkv, rotary, self.qk_norm).unbind(0)
        return super().queries_keys_values(qkv, rotary)


def use_fused_qk_norm_rope(model: GPT) -> None:
    """Swap the kernel into every attention; its tiles are half a head wide, so power-of-two head sizes only."""
    head_size = model.config.head_size
    if head_size & (head_size - 1) == 0:
        for block in model.blocks:
            block.attn.__class__ = FusedQKNormRopeAttention  # a subclass without state of its own
