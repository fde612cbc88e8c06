"""Triton kernels; imported only where one runs: on a GPU, or in Triton's interpreter (TRITON_INTERPRET=1).

`qk_norm_rope` / `qk_norm_rope_backward`: the attention's QK-norm and rotary positions, forward and backward,
each one pass over the qkv projection instead of the ~20 eager kernels (a third of an eager step of the
character model) they replace.

`softmax_numerators_`: the cross-entropy of each row of logits and, in the same single pass, the numerators
of its gradient written over the logits: exp(logit - shift) for every column, exp(logit[target] - shift) - Z
at the target, so that d(row loss)/d(logits) = numerators / Z (Z the row's sum of exp(logit - shift)). One
read and one write of the logits; the division by Z is a per-row scale the backward matmuls apply to their
small operand or result. Compiled PyTorch needs two kernels and more than twice the traffic for the same.

`accumulate_float32_`: a low-precision gradient cast into, or added to, a float32 one (weight_copies).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 8192  # columns per iteration: a row of the GPT-2 head (50304) is 7 blocks
# exp(20) keeps bf16/fp32 numerators and their sums far from overflow; float16 ends at 65504 (exp(11.1)).
HEADROOM = {torch.float16: 10.0, torch.bfloat16: 20.0, torch.float32: 20.0}


@triton.jit
def _scale_columns_(row_ptr, end, factor, BLOCK: tl.constexpr):
    tl.debug_barrier()  # every thread sees the numerators other threads of this program wrote
    for start in range(0, end, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(row_ptr + cols, mask=cols < end).to(tl.float32)
        tl.store(row_ptr + cols, (x * factor).to(row_ptr.dtype.element_ty), mask=cols < end)


@triton.jit
def _softmax_numerators_rows(
    logits_ptr,  # (N, padded) the head's output; padded columns are never predicted
    row_stride,
    targets_ptr,  # (N,) int64
    losses_ptr,  # (N,) float32 out: shift + log Z - logit[target]
    inv_sums_ptr,  # (N,) float32 out: 1 / Z
    vocab_size,
    padded_size,
    BLOCK: tl.constexpr,
    HEADROOM: tl.constexpr,  # how far above the first block's maximum a logit may be and keep the fast path
    NORMALIZE: tl.constexpr,  # float16: divide by Z in the kernel, or the target's numerator overflows
    WRITE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * row_stride
    target = tl.load(targets_ptr + row)
    target_logit = tl.load(row_ptr + target).to(tl.float32)
    # Fast path: numerators exp(x - anchor), anchor the first block's maximum, written as each block is read.
    # A block whose maximum rises HEADROOM above the anchor ends it: from there the row keeps an online
    # log-sum-exp (shift = running maximum) and is written after the loop, with what was written rescaled.
    anchor = float("-inf")
    shift = float("-inf")
    total = 0.0  # sum of exp(x - shift) so far, in float32
    written = 0  # columns written with the anchor as their shift
    for start in range(0, padded_size, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(row_ptr + cols, mask=cols < vocab_size, other=float("-inf")).to(tl.float32)
        block_maximum = tl.max(x, axis=0)
        anchor = tl.where(start == 0, block_maximum, anchor)
        fast = (written == start) & (block_maximum <= anchor + HEADROOM)
        new_shift = tl.where(fast, anchor, tl.maximum(shift, block_maximum))
        numerators = tl.exp(x - new_shift)  # 0 on the padding
        total = total * tl.exp(shift - new_shift) + tl.sum(numerators, axis=0)
        shift = new_shift
        if WRITE:
            if fast:  # the target's column too (a mask that spares it costs 3x: no vector stores)
                tl.store(row_ptr + cols, numerators.to(logits_ptr.dtype.element_ty), mask=cols < padded_size)
                written = start + BLOCK
    log_z = shift + tl.log(total)
    tl.store(losses_ptr + row, log_z - target_logit)
    if WRITE:
        if written < padded_size:  # rare: the slow path's rows
            _scale_columns_(row_ptr, written, tl.exp(anchor - shift), BLOCK)
            for start in range(written, padded_size, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                x = tl.load(row_ptr + cols, mask=cols < vocab_size, other=float("-inf")).to(tl.float32)
                tl.store(row_ptr + cols, tl.exp(x - shift).to(logits_ptr.dtype.element_ty), mask=cols < padded_size)
        if NORMALIZE:
            _scale_columns_(row_ptr, padded_size, 1.0 / total, BLOCK)
            shift = log_z
            total = tl.full((), 1.0, tl.float32)
        tl.debug_barrier()  # after every thread's store of the target's column
        tl.store(row_ptr + target, (tl.exp(target_logit - shift) - total).to(logits_ptr.dtype.element_ty))
    tl.store(inv_sums_ptr + row, 1.0 / total)


def softmax_numerators_(
    logits: torch.Tensor, targets: torch.Tensor, vocab_size: int, write: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row cross-entropy (N,) of logits (N, padded) over their first vocab_size columns, and 1 / Z (N,).

    write=True overwrites the logits with the numerators: d(row loss)/d(logits) = logits / Z afterwards.
    """
    assert logits.stride(1) == 1 and targets.shape == logits.shape[:1]
    losses, inv_sums = torch.empty((2, logits.size(0)), device=logits.device, dtype=torch.float32)
    block = min(BLOCK, triton.next_power_of_2(logits.size(1)))
    _softmax_numerators_rows[(logits.size(0),)](
        logits,
        logits.stride(0),
        targets,
        losses,
        inv_sums,
        vocab_size,
        logits.size(1),
        BLOCK=block,
        HEADROOM=HEADROOM[logits.dtype],
        NORMALIZE=write and logits.dtype == torch.float16,
        WRITE=write,
        num_warps=max(1, min(8, block // 512)),  # 8 warps for 8192 columns: the fastest on the H100
    )
    return losses, inv_sums


@triton.jit
def _qk_norm_rope_rows(
    src_ptr,  # forward: qkv (tokens, 3H, D); backward: the gradient of the output (3, tokens, H, D)
    dst_ptr,  # forward: the output (3, tokens, H, D); backward: the gradient of qkv (tokens, 3H, D)
    qkv_ptr,  # backward: qkv, to recompute the normalisation
    cos_ptr,  # (T, D): cos of the pairs' angles in the first half (rotary_tables)
    sin_ptr,  # (T, D): sin of the pairs' angles in the second half
    n_rows,  # tokens * 3H
    T,
    H,
    eps,
    HALF: tl.constexpr,  # D / 2
    ROWS: tl.constexpr,
    NORM: tl.constexpr,
    ROTATE: tl.constexpr,
    BACKWARD: tl.constexpr,
):
    rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)  # a row: one head's D values of q, k or v
    cols = tl.arange(0, HALF)[None, :]
    mask = (rows < n_rows)[:, None]
    token, head = rows // (3 * H), rows % (3 * H)
    part = head // H  # 0 q, 1 k, 2 v (v passes through)
    qkv_row = (rows * 2 * HALF)[:, None]
    out_row = ((part * (n_rows // 3) + token * H + head % H) * 2 * HALF)[:, None]
    src_row, dst_row = (out_row, qkv_row) if BACKWARD else (qkv_row, out_row)
    b1 = tl.load(src_ptr + src_row + cols, mask=mask)
    b2 = tl.load(src_ptr + src_row + HALF + cols, mask=mask)
    a1, a2 = b1.to(tl.float32), b2.to(tl.float32)
    if ROTATE:
        position = (token % T)[:, None] * 2 * HALF
        cos = tl.load(cos_ptr + position + cols, mask=mask)
        sin = tl.load(sin_ptr + position + HALF + cols, mask=mask)
    if BACKWARD:
        if ROTATE:  # the rotation's transpose
            r1 = a1 * cos + a2 * sin
            a2 = a2 * cos - a1 * sin
            a1 = r1
        if NORM:  # n = x r, r = 1/sqrt(mean(x^2) + eps): dx = r (dn - n mean(dn n))
            x1 = tl.load(qkv_ptr + qkv_row + cols, mask=mask).to(tl.float32)
            x2 = tl.load(qkv_ptr + qkv_row + HALF + cols, mask=mask).to(tl.float32)
            r = tl.rsqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / (2 * HALF) + eps)
            dot = (tl.sum(a1 * x1, 1) + tl.sum(a2 * x2, 1)) * r / (2 * HALF)  # mean(dn n)
            r, rdot = r[:, None], (r * dot)[:, None]
            a1 = r * (a1 - x1 * rdot)
            a2 = r * (a2 - x2 * rdot)
    else:
        if NORM:  # rounded to the input's precision, as F.rms_norm's output is
            r = tl.rsqrt((tl.sum(a1 * a1, 1) + tl.sum(a2 * a2, 1)) / (2 * HALF) + eps)[:, None]
            a1 = (a1 * r).to(src_ptr.dtype.element_ty).to(tl.float32)
            a2 = (a2 * r).to(src_ptr.dtype.element_ty).to(tl.float32)
        if ROTATE:
            r1 = a1 * cos - a2 * sin
            a2 = a2 * cos + a1 * sin
            a1 = r1
    passes = (part == 2)[:, None]  # v, or its gradient: copied
    tl.store(dst_ptr + dst_row + cols, tl.where(passes, b1, a1.to(dst_ptr.dtype.element_ty)), mask=mask)
    tl.store(dst_ptr + dst_row + HALF + cols, tl.where(passes, b2, a2.to(dst_ptr.dtype.element_ty)), mask=mask)


def _launch_qk_norm_rope(src, dst, qkv, cos, sin, norm: bool, rotate: bool, backward: bool) -> None:
    tokens, T, H, D = qkv.size(0) * qkv.size(1), qkv.size(1), qkv.size(3), qkv.size(4)
    n_rows, rows = tokens * 3 * H, 64
    eps = torch.finfo(qkv.dtype).eps  # F.rms_norm's default
    _qk_norm_rope_rows[(triton.cdiv(n_rows, rows),)](
        src, dst, qkv, cos, sin, n_rows, T, H, eps, HALF=D // 2, ROWS=rows, NORM=norm, ROTATE=rotate, BACKWARD=backward
    )


def qk_norm_rope(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, norm: bool, rotate: bool) -> torch.Tensor:
    """q, k (normalised, rotated) and v of qkv (B, T, 3, H, D), contiguous: (3, B, T, H, D). cos, sin (T, D)."""
    B, T, _, H, D = qkv.shape
    assert qkv.is_contiguous() and cos.is_contiguous() and sin.is_contiguous() and D & (D - 1) == 0
    out = torch.empty((3, B, T, H, D), device=qkv.device, dtype=qkv.dtype)
    _launch_qk_norm_rope(qkv, out, qkv, cos, sin, norm, rotate, backward=False)
    return out


def qk_norm_rope_backward(
    grad: torch.Tensor, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, norm: bool, rotate: bool
) -> torch.Tensor:
    """The gradient of qkv (B, T, 3, H, D) from that of qk_norm_rope's output (3, B, T, H, D)."""
    grad_qkv = torch.empty_like(qkv)
    _launch_qk_norm_rope(grad.contiguous(), grad_qkv, qkv, cos, sin, norm, rotate, backward=True)
    return grad_qkv


@triton.jit
def _accumulate_float32(total_ptr, grad_ptr, n, ADD: tl.constexpr, BLOCK: tl.constexpr):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    value = tl.load(grad_ptr + offsets, mask=mask).to(tl.float32)
    if ADD:
        value += tl.load(total_ptr + offsets, mask=mask)
    tl.store(total_ptr + offsets, value, mask=mask)


def accumulate_float32_(total: torch.Tensor, grad: torch.Tensor, add: bool) -> None:
    """total (float32) = total + grad, or = grad if not add; grad of any float dtype, both contiguous. One
    vectorised pass: PyTorch's mixed-dtype add and copy take the slower casting path (~half the bandwidth)."""
    assert total.dtype == torch.float32 and total.is_contiguous() and grad.is_contiguous()
    assert total.shape == grad.shape
    block = 4096
    _accumulate_float32[(triton.cdiv(grad.numel(), block),)](total, grad, grad.numel(), ADD=add, BLOCK=block)
