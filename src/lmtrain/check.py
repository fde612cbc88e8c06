"""The lesson's verifications on this machine: `python -m lmtrain.check accumulation|precision`.

accumulation: gradients of one batch of 8 against 4 accumulated micro-batches of 2, through our
              LanguageModel in a Lightning Trainer (Exercise 3).
"""

from __future__ import annotations

import argparse
import sys

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

from .module import LanguageModel

TINY_MODEL = dict(vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0)


class _GradientCapture(Callback):
    """Copies the gradients Lightning is about to step with (after accumulation and unscaling)."""

    def __init__(self):
        self.gradients: dict[str, torch.Tensor] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if not self.gradients:
            self.gradients = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters()}


def trainer_gradients(batch: tuple[torch.Tensor, torch.Tensor], micro_batches: int, seed: int = 0) -> dict:
    """Gradients of the first optimizer step over `batch`, fed as `micro_batches` accumulated slices."""
    torch.manual_seed(seed)
    module = LanguageModel(
        model=TINY_MODEL,
        optim=dict(max_lr=1e-3, min_lr=1e-4, warmup_steps=0),
        max_steps=1,
        tokenizer_state={"kind": "none"},
        chars_per_token={"val": 1.0, "train": 1.0},
    )
    x, y = batch
    slices = list(zip(x.chunk(micro_batches), y.chunk(micro_batches)))
    capture = _GradientCapture()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        precision="32-true",
        max_steps=1,
        accumulate_grad_batches=micro_batches,
        gradient_clip_val=None,
        callbacks=[capture],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(module, train_dataloaders=DataLoader(slices, batch_size=None))
    return capture.gradients


def accumulation_check(batch_size: int = 8, micro_batches: int = 4, tolerance: float = 1e-6) -> tuple[float, bool]:
    """(max |grad difference|, match) for one batch against accumulated micro-batches, same weights."""
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(TINY_MODEL["vocab_size"], (batch_size, TINY_MODEL["block_size"] + 1), generator=generator)
    batch = (tokens[:, :-1], tokens[:, 1:])
    whole = trainer_gradients(batch, micro_batches=1)
    accumulated = trainer_gradients(batch, micro_batches=micro_batches)
    difference = max((whole[n] - accumulated[n]).abs().max().item() for n in whole)
    return difference, difference <= tolerance


def _print_accumulation() -> bool:
    difference, match = accumulation_check()
    print("one batch of 8 vs 4 accumulated micro-batches of 2 (fp32, LanguageModel in a Lightning Trainer)")
    print(f"max gradient difference: {difference:.2e}  ->  {'match' if match else 'MISMATCH'} (tolerance 1e-6)")
    return match


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m lmtrain.check", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("what", choices=["accumulation"])
    args = parser.parse_args(argv)
    ok = {"accumulation": _print_accumulation}[args.what]()
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
