"""The head's cross-entropy, two ways around the size of its logits (fast.loss=chunked|fused).

The logits of one micro-batch of the seed recipe are 16384 x 50304 (1.65 GB in bf16, twice that in
fp32). `chunked_linear_cross_entropy` computes the head, the loss and the head's gradients a slice of
rows at a time during the forward pass, and keeps only the gradients (the size of the hidden states
and of the weight) for the backward pass. `fused_linear_cross_entropy` keeps the whole head but turns
its logits into the numerators of their own gradient in one Triton kernel (no fp32 copy, one pass).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

from ..model import GPT


def compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype a matmul of this tensor runs in: autocast's where it is on, else the tensor's own."""
    device = tensor.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else tensor.dtype


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, vocab_size: int, chunk_rows: int):
        # hidden (N, C), weight (V_padded, C), targets (N,): the mean loss over the N rows
        dtype = compute_dtype(hidden)
        head = weight[:vocab_size].to(dtype)
        n = hidden.size(0)
        loss = torch.zeros((), device=hidden.device, dtype=torch.float32)
        grad_hidden = torch.empty_like(hidden)
        grad_head = torch.zeros(head.shape, device=weight.device, dtype=torch.float32)
        for start in range(0, n, chunk_rows):
            rows = hidden[start : start + chunk_rows].to(dtype)
            target = targets[start : start + chunk_rows]
            logits = (rows @ head.T).float()  # (rows, V)
            log_z = torch.logsumexp(logits, dim=-1)
            loss += (log_z - logits.gather(1, target[:, None]).squeeze(1)).sum()
            grad_logits = torch.softmax(logits, dim=-1)  # d(mean loss)/d(logits) = (softmax - onehot) / N
            grad_logits.scatter_add_(1, target[:, None], torch.full_like(log_z, -1.0)[:, None])
            grad_logits = (grad_logits / n).to(dtype)
            grad_hidden[start : start + chunk_rows] = (grad_logits @ head).to(hidden.dtype)
            grad_head += (grad_logits.T @ rows).float()
        grad_weight = torch.zeros_like(weight)
        grad_weight[:vocab_size] = grad_head.to(weight.dtype)
        ctx.save_for_backward(grad_hidden, grad_weight)
        return loss / n

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_loss, grad_weight * grad_loss, None, None, None


def chunked_linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_size: int, chunk_rows: int = 4096
) -> torch.Tensor:
    """mean_i CE(hidden_i @ weight[:vocab_size].T, targets_i), computed `chunk_rows` rows at a time."""
    hidden, targets = hidden.reshape(-1, hidden.size(-1)), targets.reshape(-1)
    if not torch.is_grad_enabled() or not (hidden.requires_grad or weight.requires_grad):
        return sum(
            F.cross_entropy((h @ weight[:vocab_size].T).float(), t, reduction="sum")
            for h, t in zip(hidden.split(chunk_rows), targets.split(chunk_rows))
        ) / hidden.size(0)
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, targets, vocab_size, chunk_rows)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, vocab_size: int):
        # hidden (N, C), weight (V_padded, C), targets (N,): the mean loss over the N rows
        from .triton_kernels import softmax_numerators_

        rows, head, logits = _head_logits(hidden, weight)  # logits become their gradient's numerators in place
        losses, inv_sums = softmax_numerators_(logits, targets, vocab_size, write=True)
        ctx.save_for_backward(rows, head, logits, inv_sums)
        ctx.dtypes = hidden.dtype, weight.dtype
        return losses.mean()

    @staticmethod
    def backward(ctx, grad_loss):
        rows, head, numerators, inv_sums = ctx.saved_tensors
        hidden_dtype, weight_dtype = ctx.dtypes
        # d(loss)/d(logits) = row_scale * numerators: scale the (N, C) operand or result, not the (N, V) one
        row_scale = (inv_sums * (grad_loss / rows.size(0)))[:, None]
        grad_hidden = _matmul(numerators, head, torch.float32).mul_(row_scale).to(hidden_dtype)
        grad_weight = _matmul(numerators.T, rows * row_scale.to(rows.dtype), weight_dtype)
        return grad_hidden, grad_weight, None, None


def _head_logits(hidden: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hidden and weight in the compute dtype, and the logits (N, V_padded) they make."""
    dtype = compute_dtype(hidden)
    rows, head = hidden.to(dtype), weight.to(dtype)
    return rows, head, rows @ head.T


def _matmul(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """a @ b written in out_dtype; on CUDA a bf16 product goes straight to float32, without a copy."""
    if a.is_cuda and a.dtype != out_dtype:
        return torch.mm(a, b, out_dtype=out_dtype)
    return (a @ b).to(out_dtype)


@torch.compiler.disable  # a Triton kernel of our own: torch.compile stops before it and resumes after
def fused_linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_size: int
) -> torch.Tensor:
    """mean_i CE(hidden_i @ weight[:vocab_size].T, targets_i), the loss and its gradient in one Triton kernel."""
    hidden, targets = hidden.reshape(-1, hidden.size(-1)), targets.reshape(-1)
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _FusedLinearCrossEntropy.apply(hidden, weight, targets, vocab_size)
    from .triton_kernels import softmax_numerators_

    return softmax_numerators_(_head_logits(hidden, weight)[2], targets, vocab_size, write=False)[0].mean()


def head_loss(model: GPT, kind: str, chunk_rows: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The model's mean next-token loss of (idx, targets), its head computed as `kind` says: plain, chunked, fused."""
    if kind == "plain":
        return model.loss
    loss = (
        partial(chunked_linear_cross_entropy, chunk_rows=chunk_rows)
        if kind == "chunked"
        else fused_linear_cross_entropy
    )

    def head_loss(idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return loss(model.hidden_states(idx), model.lm_head.weight, targets, model.config.vocab_size)

    return head_loss
