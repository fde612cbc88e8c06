"""Draw and check the learning-rate schedule: `python -m lmtrain.schedule [optim/trainer overrides] out=lr.png`.

The lesson's Exercise 2: the configured warmup + cosine schedule, stepped through the same LambdaLR
and optimizer the training uses, drawn with the end of warmup, the end of decay and min_lr marked,
and its key points checked against their closed-form values.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .cli import command
from .config import validate_schedule
from .errors import UserError, describe_hydra_error
from .fileio import atomic_write
from .lr_schedule import warmup_cosine


def schedule_lrs(steps: int, *, warmup_steps: int, max_steps: int, max_lr: float, min_lr: float) -> list[float]:
    """The lr of optimizer steps 0..steps-1, read from a real AdamW driven by the training's LambdaLR."""
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([parameter], lr=max_lr)
    scheduler = warmup_cosine(optimizer, warmup_steps=warmup_steps, max_steps=max_steps, max_lr=max_lr, min_lr=min_lr)
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def key_points(warmup_steps: int, max_steps: int, max_lr: float, min_lr: float) -> list[tuple[str, int, float]]:
    """The lesson's checks, for any configuration: (what, step, expected lr). A warmup of the whole run has no
    decay to check: the lr stays max_lr up to max_steps."""
    points = []
    if warmup_steps > 0:
        points += [
            ("first step: max_lr / warmup", 0, max_lr / warmup_steps),
            ("mid-warmup", warmup_steps // 2, max_lr * (warmup_steps // 2 + 1) / warmup_steps),
        ]
    midpoint = (warmup_steps + max_steps) // 2
    points += [
        ("end of warmup: max_lr", warmup_steps, max_lr),
        (
            "cosine midpoint",
            midpoint,
            min_lr
            + 0.5
            * (max_lr - min_lr)
            * (1 + math.cos(math.pi * (midpoint - warmup_steps) / max(1, max_steps - warmup_steps))),
        ),
    ]
    if max_steps > warmup_steps:
        points.append(("end of decay: min_lr", max_steps, min_lr))
    points.append(("after max_steps: min_lr", max_steps + max(1, max_steps // 10), min_lr))
    return points


def plot(lrs: list[float], warmup_steps: int, max_steps: int, min_lr: float, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4))
    ax.plot(range(len(lrs)), lrs, linewidth=2)
    ax.axvline(warmup_steps, color="red", linestyle="--", alpha=0.7, label=f"warmup ends (step {warmup_steps})")
    ax.axvline(max_steps, color="green", linestyle="--", alpha=0.7, label=f"decay ends (step {max_steps})")
    ax.axhline(min_lr, color="gray", linestyle=":", alpha=0.6, label=f"min_lr = {min_lr:.1e}")
    ax.set(xlabel="optimizer step", ylabel="learning rate", title="Warmup + cosine decay")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(out, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


def run(cfg: DictConfig) -> bool:
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as err:  # an interpolation of a key not there: ${optim.lr}
        raise UserError(describe_hydra_error(err)) from err
    validate_schedule(cfg)
    if Path(cfg.out).is_dir():
        raise UserError(f"out={cfg.out} is a folder; give the image file to write, e.g. out={Path(cfg.out) / 'lr.png'}")
    o, max_steps = cfg.optim, cfg.trainer.max_steps
    schedule = dict(warmup_steps=o.warmup_steps, max_steps=max_steps, max_lr=o.max_lr, min_lr=o.min_lr)
    points = key_points(**schedule)
    lrs = schedule_lrs(max(p[1] for p in points) + 1, **schedule)
    plot(lrs, o.warmup_steps, max_steps, o.min_lr, Path(cfg.out))
    print(f"warmup {o.warmup_steps} steps to max_lr {o.max_lr:g}, cosine to min_lr {o.min_lr:g} at step {max_steps}")
    all_ok = True
    for what, step, expected in points:
        ok = math.isclose(lrs[step], expected, rel_tol=1e-6)
        all_ok &= ok
        print(f"  {'✓' if ok else '✗'} step {step:>6}  lr {lrs[step]:.6e}  expected {expected:.6e}  ({what})")
    print(f"{cfg.out}: the schedule drawn; key points {'all match' if all_ok else 'do NOT match'}")
    return all_ok


def draw_and_check(cfg: DictConfig) -> None:
    """The command: draw the schedule and exit 1 unless every key point matches."""
    if not run(cfg):
        raise SystemExit(1)


main = command(draw_and_check, config_name="schedule")


if __name__ == "__main__":
    main()
