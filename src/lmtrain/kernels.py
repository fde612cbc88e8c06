"""Triton kernels; imported only when a fused option is on (on a machine without a GPU, under TRITON_INTERPRET=1).

`cross_entropy_rows_`: the loss of each row of logits and, in the same kernel, the gradient of the mean loss
written over the logits. One read of the logits for the log-sum-exp, one more (partly from L2) and one write
for the gradient: compiled PyTorch needs two kernels and twice the memory traffic for the same result.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 8192  # columns per iteration: a row of the GPT-2 head (50304) is 7 blocks


@triton.jit
def _cross_entropy_rows(
    logits_ptr,  # (N, padded) the head's output; padded columns are never predicted
    row_stride,
    targets_ptr,  # (N,) int64
    losses_ptr,  # (N,) float32 out: log Z - logit[target]
    vocab_size,
    padded_size,
    grad_scale,  # d(loss)/d(row loss): 1 / N for a mean
    BLOCK: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * row_stride
    target = tl.load(targets_ptr + row)
    # online log-sum-exp in float32: running maximum and the sum of exp(x - maximum)
    maximum = float("-inf")
    total = 0.0
    for start in range(0, vocab_size, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(row_ptr + cols, mask=cols < vocab_size, other=float("-inf")).to(tl.float32)
        new_maximum = tl.maximum(maximum, tl.max(x, axis=0))
        total = total * tl.exp(maximum - new_maximum) + tl.sum(tl.exp(x - new_maximum), axis=0)
        maximum = new_maximum
    log_z = maximum + tl.log(total)
    tl.store(losses_ptr + row, log_z - tl.load(row_ptr + target).to(tl.float32))
    if WRITE_GRAD:  # d(row loss)/d(logits) = softmax - onehot(target); 0 on the padding
        n_blocks = tl.cdiv(padded_size, BLOCK)
        for i in range(0, n_blocks):  # last block first: the blocks read last are the likeliest still in L2
            cols = (n_blocks - 1 - i) * BLOCK + tl.arange(0, BLOCK)
            x = tl.load(row_ptr + cols, mask=cols < vocab_size, other=float("-inf")).to(tl.float32)
            grad = tl.exp(x - log_z) - tl.where(cols == target, 1.0, 0.0)
            tl.store(row_ptr + cols, (grad * grad_scale).to(logits_ptr.dtype.element_ty), mask=cols < padded_size)


def cross_entropy_rows_(logits: torch.Tensor, targets: torch.Tensor, vocab_size: int, grad: bool) -> torch.Tensor:
    """Per-row cross-entropy (N,) in float32 of logits (N, padded) over their first vocab_size columns.

    grad=True overwrites the logits with d(mean loss)/d(logits) = (softmax - onehot) / N.
    """
    assert logits.stride(1) == 1 and targets.shape == logits.shape[:1]
    losses = torch.empty(logits.size(0), device=logits.device, dtype=torch.float32)
    block = min(BLOCK, triton.next_power_of_2(logits.size(1)))
    _cross_entropy_rows[(logits.size(0),)](
        logits,
        logits.stride(0),
        targets,
        losses,
        vocab_size,
        logits.size(1),
        1.0 / logits.size(0),
        BLOCK=block,
        WRITE_GRAD=grad,
        num_warps=max(1, min(8, block // 512)),  # 8 warps for 8192 columns: the fastest on the H100
    )
    return losses
