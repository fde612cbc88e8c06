"""Cross-entropy of the language-model head without materialising all the logits.

The logits of one micro-batch of the seed recipe are 16384 x 50304 (1.65 GB in bf16, twice that in
fp32). `chunked_linear_cross_entropy` computes the head, the loss and the head's gradients a slice of
rows at a time during the forward pass, and keeps only the gradients (the size of the hidden states
and of the weight) for the backward pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, vocab_size: int, chunk_rows: int):
        # hidden (N, C), weight (V_padded, C), targets (N,): the mean loss over the N rows
        compute_dtype = (
            torch.get_autocast_dtype(hidden.device.type)
            if torch.is_autocast_enabled(hidden.device.type)
            else hidden.dtype
        )
        head = weight[:vocab_size].to(compute_dtype)
        n = hidden.size(0)
        loss = torch.zeros((), device=hidden.device, dtype=torch.float32)
        grad_hidden = torch.empty_like(hidden)
        grad_head = torch.zeros(head.shape, device=weight.device, dtype=torch.float32)
        for start in range(0, n, chunk_rows):
            rows = hidden[start : start + chunk_rows].to(compute_dtype)
            target = targets[start : start + chunk_rows]
            logits = (rows @ head.T).float()  # (rows, V)
            log_z = torch.logsumexp(logits, dim=-1)
            loss += (log_z - logits.gather(1, target[:, None]).squeeze(1)).sum()
            grad_logits = torch.softmax(logits, dim=-1)  # d(mean loss)/d(logits) = (softmax - onehot) / N
            grad_logits.scatter_add_(1, target[:, None], torch.full_like(log_z, -1.0)[:, None])
            grad_logits = (grad_logits / n).to(compute_dtype)
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
