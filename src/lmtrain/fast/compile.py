"""torch.compile applied to the training loss (fast.compile_scope=model) or to the blocks (blocks)."""

from __future__ import annotations

import torch

from ..model import GPT

GRAPH_MODES = ("reduce-overhead", "max-autotune")  # Inductor's CUDA graph trees replay the compiled step


def compile_blocks(model: GPT, mode: str | None) -> None:
    """Compile each block's training forward (dropout on, no cache). The blocks are alike, so one compiled
    graph serves every layer: a cold compile about half as long as the whole loss's, a step a little slower.
    Evaluation and generation run the eager blocks."""
    for block in model.blocks:
        eager = block.forward
        compiled = torch.compile(eager, mode=mode)

        def forward(x, rotary=None, cache=None, block=block, eager=eager, compiled=compiled):
            return (compiled if block.training and cache is None else eager)(x, rotary, cache)

        block.forward = forward
