"""Low-precision copies of the matmul weights, cast once per optimizer step rather than once per micro-batch."""

from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn


class WeightCopies:
    """Copies of a model's nn.Linear weights in the autocast dtype, for the training forward.

    Under autocast every micro-batch's forward casts each float32 weight to bf16, and each bf16 weight
    gradient is cast to float32 and then added to .grad. With the copies, the forward reads weights already
    cast (refresh() after each optimizer step), and each copy's gradient goes into its float32 weight's .grad
    as soon as it arrives: a cast the first micro-batch, one fused cast-and-add each later one. The values are
    autocast's: the same roundings, the same float32 sums. A weight an embedding also reads (GPT-2's tied
    head) keeps autocast's casts, since the lookup reads it in float32.
    """

    def __init__(self, model: nn.Module, dtype: torch.dtype):
        linear_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
        embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
        copied = linear_weights - embedding_weights  # a tied embedding looks up float32 rows: left as they are
        self.weights = {name: p for name, p in model.named_parameters() if id(p) in copied}
        self.copies = {name: nn.Parameter(p.detach().to(dtype)) for name, p in self.weights.items()}
        for name, copy in self.copies.items():
            torch._dynamo.mark_static_address(copy)  # CUDA graphs read it in place, as they read parameters
            copy.register_post_accumulate_grad_hook(partial(_move_grad, self.weights[name]))

    @torch.no_grad()
    def refresh(self) -> None:
        """Cast the float32 weights into the copies: after every optimizer step."""
        torch._foreach_copy_(list(self.copies.values()), list(self.weights.values()))

    def release_grads(self) -> None:
        """Start the next accumulation from None: the first micro-batch's gradient is cast, not added to zeros."""
        for weight in self.weights.values():
            weight.grad = None


def _move_grad(weight: nn.Parameter, copy: nn.Parameter) -> None:
    grad, first = copy.grad, weight.grad is None
    if grad.is_cuda and grad.is_contiguous() and (first or weight.grad.is_contiguous()):
        from .triton_kernels import accumulate_float32_

        if first:
            weight.grad = torch.empty_like(weight)
        accumulate_float32_(weight.grad, grad, add=not first)
    elif first:
        weight.grad = grad.to(weight.dtype)
    else:
        weight.grad.add_(grad)
    copy.grad = None
