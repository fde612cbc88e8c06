"""The speed pieces that act while training runs, as one Lightning callback: weight copies, compiling, CUDA
graphs and the gradient buffers they need. Its plain methods are what `bench --raw` calls in its own loop."""

from __future__ import annotations

from functools import partial

import torch
from lightning.pytorch.callbacks import Callback

from ..precision import autocast_dtype
from .compile import GRAPH_MODES
from .cuda_graphs import LossModule, capture_loss
from .weight_copies import WeightCopies


class FastTraining(Callback):
    def __init__(self, config, precision: str):
        self.config, self.dtype = config, autocast_dtype(precision)
        self.graph_trees = config.compile and config.compile_mode in GRAPH_MODES
        self.copies: WeightCopies | None = None
        self.captured = False

    def start(self, module, accumulate: int, optimizer: torch.optim.Optimizer) -> None:
        """Before the first step: weight copies, the compiled loss, gradient buffers of our own."""
        config = self.config
        if config.cast_weights_once:
            self.copies = WeightCopies(module.model, self.dtype)
            module.train_loss = partial(_loss_with, LossModule(module.model, module.train_loss), self.copies.copies)
            optimizer.register_step_post_hook(lambda *_: self.copies.refresh())
        if config.compile and config.compile_scope == "model":
            module.train_loss = torch.compile(module.train_loss, mode=config.compile_mode)
        if (config.cuda_graphs or self.graph_trees) and accumulate > 1:
            # Accumulating into a gradient set from None would add to the graph's output buffer, which the next
            # micro-batch overwrites: keep buffers of our own and add to them in place.
            module.keep_gradient_buffers = True
            for p in module.model.parameters():
                if p.grad is None:
                    p.grad = torch.zeros_like(p)

    def before_micro_batch(self, module, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.graph_trees:  # each micro-batch is a new iteration: earlier graph outputs may be reused
            torch.compiler.cudagraph_mark_step_begin()
        if self.config.cuda_graphs and not self.captured:
            module.train_loss = capture_loss(module.model, module.train_loss, x, y, self.dtype)
            self.captured = True

    def before_zero_grad(self) -> None:
        if self.copies is not None:  # the next accumulation starts from None: its first gradient is cast, not added
            self.copies.release_grads()

    def on_train_start(self, trainer, pl_module) -> None:
        self.start(pl_module, trainer.accumulate_grad_batches, trainer.optimizers[0])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self.before_micro_batch(pl_module, *batch)

    def on_before_zero_grad(self, trainer, pl_module, optimizer) -> None:
        self.before_zero_grad()


def _loss_with(loss: LossModule, copies: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The loss with the weight copies in place of the model's weights they copy."""
    return torch.func.functional_call(loss, {f"model.{name}": copy for name, copy in copies.items()}, (x, y))
