"""The schedule is the lesson's get_lr, through a real LambdaLR driving a real optimizer."""

from __future__ import annotations

import math

import pytest
import torch

from lmtrain.lr_schedule import get_lr, warmup_cosine

LESSON = dict(warmup_steps=200, max_steps=5000, max_lr=3e-4, min_lr=3e-5)
KEY_POINTS = {0: 1.5e-6, 100: 1.515e-4, 200: 3e-4, 2600: 1.65e-4, 5000: 3e-5, 5500: 3e-5}


def lrs_through_lambdalr(steps: int, **schedule) -> list[float]:
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([parameter], lr=schedule["max_lr"])
    scheduler = warmup_cosine(optimizer, **schedule)
    lrs = []
    for _ in range(steps):
        lrs.append(optimizer.param_groups[0]["lr"])  # the lr the next optimizer.step() uses
        optimizer.step()
        scheduler.step()
    return lrs


def test_lesson_key_points_through_lambdalr():
    lrs = lrs_through_lambdalr(5501, **LESSON)
    for step, expected in KEY_POINTS.items():
        assert lrs[step] == pytest.approx(expected, rel=1e-9), step


def test_lambdalr_equals_pure_function_everywhere():
    lrs = lrs_through_lambdalr(5200, **LESSON)
    assert all(lr == pytest.approx(get_lr(s, **LESSON), rel=1e-12) for s, lr in enumerate(lrs))


def test_shape_warmup_linear_cosine_monotone_then_flat():
    lrs = [get_lr(s, **LESSON) for s in range(6000)]
    warmup = lrs[:200]
    assert all(b > a for a, b in zip(warmup, warmup[1:]))
    decay = lrs[200:5001]
    assert all(b <= a for a, b in zip(decay, decay[1:]))
    assert set(lrs[5001:]) == {3e-5}
    assert math.isclose(max(lrs), 3e-4)


def test_no_warmup_starts_at_max_lr():
    assert get_lr(0, warmup_steps=0, max_steps=100, max_lr=1e-3, min_lr=1e-4) == pytest.approx(1e-3)
