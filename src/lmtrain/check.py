"""The lesson's verifications on this machine: `python -m lmtrain.check accumulation|precision`.

accumulation: gradients of one batch of 8 against 4 accumulated micro-batches of 2, through our
              LanguageModel in a Lightning Trainer (Exercise 3).
precision:    fp16 gradients underflowing to zero without loss scaling and surviving with the GradScaler,
              the ranges of fp16 and bf16, and (with a GPU) the speed and memory of fp32/bf16/fp16 steps.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

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


@contextmanager
def _lightning_quiet() -> Iterator[None]:
    """Without Lightning's INFO lines (devices, a litlogger tip, max_steps reached: the check says what it ran), its
    "GPU available but not used" and the FutureWarning of its CombinedLoader building torch's deprecated LeafSpec
    (Lightning 2.6 on torch 2.13)."""
    logger = logging.getLogger("lightning.pytorch")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")
            warnings.filterwarnings("ignore", message="GPU available but not used")  # the check runs on the CPU
            yield
    finally:
        logger.setLevel(level)


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
    with _lightning_quiet():
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
        loader = DataLoader(slices, batch_size=None)
        trainer.fit(module, train_dataloaders=loader, val_dataloaders=loader)  # unused (limit_val_batches=0), but
        # without one Lightning warns that the module's validation_step has no loader
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


def underflow_demo(device: str) -> dict:
    """Gradients of a loss scaled down to ~1e-8 per element: fp16 flushes them, the GradScaler saves them."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(64, 64).to(device)
    x = torch.randn(32, 64, device=device)
    fractions = {}
    for name, scaler in (("fp16 without scaling", None), ("fp16 with GradScaler", torch.amp.GradScaler(device))):
        layer.zero_grad()
        with torch.autocast(device, dtype=torch.float16):
            out = layer(x)
        # tiny upstream gradients, as deep in a network late in training: they arrive in fp16
        loss = (out.float() * 1e-9).sum()
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.unscale_(torch.optim.SGD(layer.parameters(), lr=0.0))
        grad = layer.weight.grad
        fractions[name] = (grad == 0).float().mean().item()
    return fractions


def precision_speed(steps: int = 20) -> list[tuple[str, float, float]]:
    """(precision, ms per step, peak GiB) of the gpt10m model's training step at batch 16 on the GPU."""
    return [
        (name, *_time_training_step(dtype, steps))
        for name, dtype in (("fp32", None), ("bf16", torch.bfloat16), ("fp16", torch.float16))
    ]


def _time_training_step(dtype: torch.dtype | None, steps: int) -> tuple[float, float]:
    from .model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(dropout=0.0)).cuda()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype is torch.float16)
    idx = torch.randint(50257, (16, 257), device="cuda")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()

    def step():
        with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = model.loss(idx[:, :-1], idx[:, 1:])
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps * 1e3, torch.cuda.max_memory_allocated() / 2**30


def _print_precision() -> bool:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"on {torch.cuda.get_device_name() if device == 'cuda' else 'the CPU'}:")
    print("\n1. Underflow: a linear layer whose upstream gradients are ~1e-9 (below fp16's smallest subnormal, 6e-8)")
    demo = underflow_demo(device)
    for name in ("fp16 without scaling", "fp16 with GradScaler"):
        print(f"   {name:<22} {demo[name]:6.1%} of the weight gradients are exactly zero")
    lost, kept = demo["fp16 without scaling"], demo["fp16 with GradScaler"]
    print(f"   -> loss scaling {'keeps' if kept < lost else 'does not keep'} the gradients fp16 would flush to zero")
    print("\n2. Ranges: bf16 has fp32's exponent (8 bits), fp16 only 5; fp16 has more mantissa (10 bits vs 7)")
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        info = torch.finfo(dtype)
        name = str(dtype).removeprefix("torch.")
        print(f"   {name:<9} max {info.max:9.3e}  smallest normal {info.tiny:9.3e}  eps {info.eps:.1e}")
    for value in (1e-9, 70000.0):
        f16, b16 = torch.tensor(value).half().item(), torch.tensor(value).bfloat16().item()
        print(f"   {value:g} -> fp16 {f16:g}, bf16 {b16:g}")
    if device == "cuda":
        print("\n3. One training step of the gpt10m model (batch 16 x 256, fused AdamW):")
        for name, ms, gib in precision_speed():
            print(f"   {name:<5} {ms:7.2f} ms/step   peak memory {gib:5.2f} GiB")
    else:
        print("\n3. Speed and memory per precision: needs a CUDA GPU (none here).")
    return kept < lost


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m lmtrain.check", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("what", choices=["accumulation", "precision"])
    args = parser.parse_args(argv)
    ok = {"accumulation": _print_accumulation, "precision": _print_precision}[args.what]()
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
