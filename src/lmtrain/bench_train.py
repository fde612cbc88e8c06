"""`python -m lmtrain.bench train [--raw] [--steps N] [--warmup N] [--out FILE] [training overrides ...]`

Times optimizer steps of the real training path: our data module, LightningModule and Trainer, built
from the same config as `lmtrain.train` (evaluation, sampling and checkpoints left out: they are not
per-step work), stopped after --warmup + --steps optimizer steps of the configured schedule. `--raw`
times the same model, data, loss and optimizer in a minimal hand-written loop, so the harness's own
overhead is the difference. The device is synchronised only at the start and the
end of the timed window.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from contextlib import nullcontext

import torch

from . import build
from .cli import compose
from .config import check_machine, training_block_size, validate
from .errors import UserError
from .optim import clip_gradients_
from .precision import PRECISIONS, autocast_dtype, compute_dtype

# Lightning's table misses "NVIDIA H200" by name (its H200 rows are the datasheet's with-sparsity figures); the
# H200 has the H100 SXM's tensor cores and clocks, so its dense peak is the H100 SXM's.
H200_DENSE_FLOPS = {torch.bfloat16: 989.4e12, torch.float16: 989.4e12}


def parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        prog="python -m lmtrain.bench train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--raw", action="store_true", help="a minimal hand-written loop instead of the Trainer")
    parser.add_argument("--steps", type=int, default=None, help="timed optimizer steps (GPU 50, CPU 20)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (compile; GPU 10, CPU 3)")
    parser.add_argument("--out", help="also write the results as JSON")
    return parser.parse_known_args(argv)


def flops_per_token(model) -> int:
    """6N + 12·L·H·Q·T: N the parameters without the position table (the tied head counted once)."""
    c = model.config
    n = model.num_params() - (model.wpe.weight.numel() if model.wpe is not None else 0)
    return 6 * n + 12 * c.n_layer * c.n_head * c.head_size * c.block_size


def peak_flops(device: torch.device, precision: str) -> float | None:
    from lightning.fabric.utilities.throughput import get_available_flops

    if device.type != "cuda":
        return None
    dtype = compute_dtype(precision)
    if "h200" in torch.cuda.get_device_name(device).lower():
        return H200_DENSE_FLOPS.get(dtype)
    return get_available_flops(device, dtype)


class _StepTimer:
    """Synchronises once at the end of warm-up and once at the end of the timed steps."""

    def __init__(self, warmup: int, steps: int, device: torch.device):
        self.warmup, self.steps, self.device = warmup, steps, device
        self.start_time = time.perf_counter()
        self.window: list[float] = []

    def after_step(self, step: int) -> None:  # step: optimizer steps completed (repeats while accumulating)
        if step == (self.warmup, self.warmup + self.steps)[min(len(self.window), 1)] and len(self.window) < 2:
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            self.window.append(time.perf_counter())

    def result(self) -> tuple[float, float]:
        """(seconds per step, seconds before the timed window: start-up, compile and warm-up)"""
        return (self.window[1] - self.window[0]) / self.steps, self.window[0] - self.start_time


def run_lightning(cfg, warmup: int, steps: int) -> tuple[float, float, torch.nn.Module, torch.device]:
    from lightning.pytorch.callbacks import Callback

    datamodule = build.build_datamodule(cfg)
    datamodule.prepare_data()
    module = build.build_module(cfg, datamodule)
    periodic = ("best_checkpoint", "resume_checkpoints", "sample_text", "summary")
    callbacks = [c for name, c in zip(cfg.callbacks, build.build_callbacks(cfg)) if name not in periodic]
    callbacks += build.apply_fast(cfg, module)
    trainer = build.build_trainer(cfg, callbacks, build.build_logger(cfg))
    timer = _StepTimer(warmup, steps, torch.device("cpu"))

    class Timing(Callback):
        def on_train_start(self, trainer, pl_module):
            timer.device = pl_module.device  # known once the strategy has placed the model

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            timer.after_step(trainer.global_step)
            if trainer.global_step >= warmup + steps:
                trainer.should_stop = True

    trainer.callbacks.append(Timing())
    timer.start_time = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    return *timer.result(), module.model, timer.device


def run_raw(cfg, warmup: int, steps: int) -> tuple[float, float, torch.nn.Module, torch.device]:
    """The same model, windows, fast pieces and step (the module's own loss, clipping and non-finite rule, the
    optimizer and schedule), in the plainest loop: what differs from run_lightning is the harness alone."""
    from .data.windows import RandomWindows

    start = time.perf_counter()
    torch.set_float32_matmul_precision(cfg.trainer.matmul_precision)
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.trainer.accelerator != "cpu" else "cpu")
    datamodule = build.build_datamodule(cfg)
    datamodule.prepare_data()
    module = build.build_module(cfg, datamodule)
    (fast,) = build.apply_fast(cfg, module)
    module.to(device).train()
    tokens = datamodule.split_tokens("train", device)
    accumulate = build.accumulation(cfg)
    windows = RandomWindows(tokens, training_block_size(cfg), cfg.trainer.batch_size, cfg.seed, 0, lambda: 0)
    precision = cfg.trainer.precision
    optimizer, scheduler = module.optimizer_and_schedule(device.type, precision)
    dtype = autocast_dtype(precision)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype else nullcontext()
    scaler = torch.amp.GradScaler(device.type, enabled=PRECISIONS[precision].loss_scaling)
    timer = _StepTimer(warmup, steps, device)
    timer.start_time = start
    module.on_train_start()
    fast.start(module, accumulate, optimizer)
    batch = 0
    for step in range(1, warmup + steps + 1):
        for micro in range(accumulate):
            x, y = windows.batch(batch)
            batch += 1
            fast.before_micro_batch(module, x, y)
            with autocast:
                loss = module.training_step((x, y), batch)
            if micro == 0:
                fast.before_zero_grad()
                module.optimizer_zero_grad(0, batch, optimizer)
            scaler.scale(loss / accumulate).backward()
        scaler.unscale_(optimizer)
        norm = clip_gradients_(module.model, optimizer, cfg.trainer.gradient_clip_val)
        module.hold_back_nonfinite_update(optimizer, norm, PRECISIONS[precision])
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        timer.after_step(step)
    return *timer.result(), module.model, device


def bench_train(argv: list[str]) -> tuple[argparse.Namespace, dict]:
    args, overrides = parse(argv)
    on_gpu = torch.cuda.is_available()
    warmup = args.warmup if args.warmup is not None else (10 if on_gpu else 3)
    steps = args.steps if args.steps is not None else (50 if on_gpu else 20)
    with tempfile.TemporaryDirectory() as output_dir:
        # the configured schedule and run length stay; no evaluation falls inside the measured steps
        no_eval = ["trainer.eval_interval=1000000", "trainer.eval_at_start=false"]
        cfg = compose("train", [*overrides, *no_eval, f"output_dir={output_dir}"])
        if cfg.trainer.max_steps < warmup + steps:
            raise UserError(
                f"trainer.max_steps={cfg.trainer.max_steps} is below the {warmup} + {steps} steps to "
                "run; lower --warmup/--steps or raise trainer.max_steps"
            )
        validate(cfg)
        check_machine(cfg)
        torch.cuda.reset_peak_memory_stats() if on_gpu else None
        seconds, before, model, device = (run_raw if args.raw else run_lightning)(cfg, warmup, steps)
    tokens = build.tokens_per_step(cfg)
    peak = peak_flops(device, cfg.trainer.precision)
    per_token = flops_per_token(model)
    result = {
        "path": "raw loop" if args.raw else "Lightning Trainer",
        "overrides": overrides,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "precision": cfg.trainer.precision,
        "steps": steps,
        "warmup_steps": warmup,
        "tokens_per_step": tokens,
        "ms_per_step": seconds * 1e3,
        "tokens_per_s": tokens / seconds,
        "flops_per_token": per_token,
        "peak_flops": peak,
        "mfu": per_token * tokens / seconds / peak if peak else None,
        "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "startup_compile_warmup_s": before,
    }
    mfu = (
        f"MFU {result['mfu']:.1%} of {peak / 1e12:.0f} TFLOP/s"
        if peak
        else f"MFU n/a (no peak FLOP/s known for {result['device']} at {cfg.trainer.precision})"
    )
    memory = f", peak memory {result['peak_memory_gib']:.2f} GiB" if result["peak_memory_gib"] is not None else ""
    print(
        f"bench train ({result['path']}) {' '.join(overrides)} on {result['device']}: "
        f"{result['ms_per_step']:.2f} ms/step, {result['tokens_per_s']:,.0f} tokens/s, {mfu}{memory}, "
        f"start-up+compile+warm-up {before:.1f} s, {steps} timed steps of {tokens:,} tokens",
        flush=True,
    )
    return args, result
