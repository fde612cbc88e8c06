"""Lightning DDP on two CPU processes (gloo): one run folder, one set of outputs, the single-process path."""

from __future__ import annotations

import json

import pytest

from lmtrain.build import accumulation, world_size
from lmtrain.errors import UserError

from .conftest import compose, scalars, smoke, smoke_here

SAME = ["model.dropout=0.0", "trainer.max_steps=30", "trainer.eval_interval=10"]


def test_two_ranks_train_into_one_folder_and_follow_the_single_process_path(tmp_path):
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    smoke_here(single, *SAME, "trainer.batch_size=8")  # one process: no need for a second import
    smoke(ddp, *SAME, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.batch_size=4")
    assert len(list(tmp_path.rglob("summary.json"))) == 2  # one per run, none from the second rank
    assert len(list(ddp.rglob(".hydra"))) == 1 and (ddp / "train_ddp_process_1.log").exists()
    assert len(list(ddp.glob("tb/*/events.out.tfevents.*"))) >= 1
    a, b = dict(scalars(single)["val/loss"]), dict(scalars(ddp)["val/loss"])
    assert sorted(a) == sorted(b) == [0, 10, 20, 30]
    for step in a:  # the two halves of each batch, gradients averaged: the same steps up to rounding
        assert b[step] == pytest.approx(a[step], rel=1e-4)
    assert json.loads((ddp / "summary.json").read_text())["steps"] == 30


def test_tokens_per_step_keeps_the_global_batch_for_any_world_size():
    base = ["trainer.tokens_per_step=65536", "trainer.batch_size=64", "trainer.accelerator=cpu"]
    assert accumulation(compose(*base, "trainer.devices=1")) == 4
    cfg = compose("trainer=ddp", *base, "trainer.devices=4")
    assert world_size(cfg) == 4 and accumulation(cfg) == 1
    with pytest.raises(UserError, match="tokens_per_step=65536 is not a multiple"):
        accumulation(compose("trainer=ddp", *base, "trainer.devices=8"))
