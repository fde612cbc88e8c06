"""Faults that must never cost a run: kills, signals, full disks, broken files, non-finite losses, bad input."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from hydra.errors import HydraException
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lightning.pytorch.callbacks import Callback
from omegaconf.errors import OmegaConfBaseException

from lmtrain.checkpointing import AtomicCheckpointIO, load_checkpoint, resolve_ckpt_path
from lmtrain.errors import UserError
from lmtrain.fileio import atomic_write_bytes
from lmtrain.tokenizer.bpe import BPETokenizer
from lmtrain.train import train

from .conftest import REPO, compose, process_state_kept, run_cli, scalars, smoke, smoke_here, train_here

ARGS = ["trainer.max_steps=240", "checkpoint.every_n_steps=20", "trainer.eval_interval=40"]


def weights(run_dir):
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]


def start(run_dir, *overrides):
    return subprocess.Popen(
        [sys.executable, "-m", "lmtrain.train", "experiment=smoke", f"hydra.run.dir={run_dir}", *ARGS, *overrides],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def newest_step(run_dir) -> int:
    return max((int(p.stem.split("-")[1]) for p in run_dir.glob("checkpoints/step-*.ckpt")), default=-1)


def wait_for_a_new_checkpoint(run_dir, timeout: float = 120) -> None:
    """Until a step checkpoint newer than those already there is written: the run has made progress."""
    before = newest_step(run_dir)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if newest_step(run_dir) > before:
            return
        time.sleep(0.05)
    raise AssertionError("no checkpoint appeared")


def test_killed_three_times_and_resumed_equals_the_uninterrupted_run(tmp_path):
    reference = tmp_path / "reference"
    smoke(reference, *ARGS)
    run = tmp_path / "killed"
    rng = random.Random(7)
    for kill in range(3):
        process = start(run, *(["ckpt_path=last"] if kill else []))
        wait_for_a_new_checkpoint(run)
        time.sleep(rng.uniform(0.0, 1.5))  # anywhere: mid-step, mid-evaluation or mid-write
        process.send_signal(signal.SIGKILL)
        process.wait()
    smoke(run, *ARGS, "ckpt_path=last")
    # logged series first: a failure names the first step that differs (both runs stay under tmp_path)
    logged_reference, logged_run = scalars(reference), scalars(run)
    for tag in ("train/grad_norm", "train/loss", "val/loss"):
        expected, got = logged_reference[tag], sorted(set(logged_run[tag]))
        first = next(((a, b) for a, b in zip(expected, got) if a != b), None)
        assert expected == got, f"{tag}: first (step, value) uninterrupted vs resumed {first}, runs in {tmp_path}"
    a, b = weights(reference), weights(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cpu_matmuls_round_the_same_in_every_process():
    """MKL's reproducible mode is on once lmtrain is imported (the resume test above depends on it)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MKL_CBWR", "MKL_DYNAMIC")}
    code = "import lmtrain, torch; a = torch.randn(64, 64); a @ a"
    out = subprocess.run(
        [sys.executable, "-c", code], env={**env, "MKL_VERBOSE": "1"}, capture_output=True, text=True, check=True
    ).stdout
    if "MKL_VERBOSE" not in out:
        pytest.skip("this torch does not use MKL")
    assert "CNR:AUTO" in out and "Dyn:0" in out


def test_sigterm_saves_a_checkpoint_stops_cleanly_and_resumes(tmp_path):
    run = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-m", "lmtrain.train", "experiment=smoke", f"hydra.run.dir={run}", "trainer.max_steps=5000"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    wait_for_a_new_checkpoint(run)
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM  # 143, as a shell reports it: not a finished run
    assert "stopped by SIGTERM after step" in out and "resume with: python -m lmtrain.train" in out
    log = (run / "train.log").read_text()  # what the console showed, without the live bar
    assert "model: " in log and "step      0  val " in log and "stopped by SIGTERM after step" in log
    assert "Training" not in log
    bad = run_cli("lmtrain.train", "experiment=smoke", "optim.min_lr=1.0", f"hydra.run.dir={tmp_path / 'bad'}")
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1] in (tmp_path / "bad" / "train.log").read_text()
    step = load_checkpoint(resolve_ckpt_path("last", run))["global_step"]
    smoke(run, "trainer.max_steps=5000", "ckpt_path=last", "trainer.max_steps=" + str(step + 10))
    assert json.loads((run / "summary.json").read_text())["steps"] == step + 10


class SendSignalAt(Callback):
    """Sends this process `signum` at the end of micro-batch number `micro_batch` (from 1) of the run; counts the
    micro-batches that ended, in `SendSignalAt.ended`."""

    ended = 0

    def __init__(self, micro_batch: int, signum: int):
        self.micro_batch, self.signum = micro_batch, signum
        SendSignalAt.ended = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        SendSignalAt.ended += 1
        if SendSignalAt.ended == self.micro_batch:
            os.kill(os.getpid(), self.signum)


ACCUMULATED = [
    "trainer.max_steps=30",
    "trainer.accumulate_grad_batches=4",
    "trainer.eval_interval=10",
    "optim.warmup_steps=3",
    "checkpoint.every_n_steps=5",
    "model.dropout=0.1",
    "trainer.log_every_n_steps=1",
]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_at_the_next_micro_batch_and_the_resumed_run_is_exact(tmp_path, signum):
    """Two micro-batches into step 12 of 4: no waiting for the step's end, no evaluation Lightning adds on a
    stop, a checkpoint of step 11 (the first not written by every_n_steps), and the resumed run redoes step 12
    from the RNG state it began with (dropout draws from it), ending as the uninterrupted run."""
    if threading.current_thread() is not threading.main_thread():  # an xdist that runs tests in a worker thread
        pytest.skip("signal handlers are set in the main thread only: the signal would end this test process")
    reference = smoke_here(tmp_path / "reference", *ACCUMULATED)
    run = tmp_path / "stopped"
    signal_at = [f"+callbacks.signal._target_={__name__}.SendSignalAt", f"+callbacks.signal.signum={int(signum)}"]
    stopped = train_here(run, "experiment=smoke", *ACCUMULATED, *signal_at, "+callbacks.signal.micro_batch=46")
    assert stopped.returncode == 128 + signum and SendSignalAt.ended == 46
    assert f"stopped by {signal.Signals(signum).name} after step 11" in stopped.stdout
    last = load_checkpoint(run / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 11 and os.readlink(run / "checkpoints" / "last.ckpt") == "step-000011.ckpt"
    assert json.loads((run / "summary.json").read_text())["steps"] == 11
    evaluated = [step for step, _ in scalars(tmp_path / "reference")["val/loss"] if step <= 11]
    assert [step for step, _ in scalars(run)["val/loss"]] == evaluated  # those of the steps taken, no more
    smoke_here(run, *ACCUMULATED, f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}")
    logged_reference, logged_run = scalars(tmp_path / "reference"), scalars(run)
    for tag in ("train/loss", "train/grad_norm", "val/loss"):
        assert sorted(set(logged_run[tag])) == logged_reference[tag], tag
    a, b = weights(tmp_path / "reference"), weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a), reference.stdout[-500:]


class PoisonWeightsAt(Callback):
    """Sets one weight to NaN after optimizer step `step`, as a diverged update would."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                next(pl_module.parameters()).view(-1)[0] = float("nan")


def test_non_finite_weights_are_never_written_as_best_or_last(tmp_path):
    run = tmp_path / "run"
    result = train_here(
        run, "experiment=smoke", "trainer.max_steps=40", "trainer.eval_interval=10", "checkpoint.every_n_steps=10",
        f"+callbacks.poison._target_={__name__}.PoisonWeightsAt", "+callbacks.poison.step=15",
    )  # fmt: skip
    assert result.returncode == 2 and "the weights at step 20 are not finite" in result.stderr
    assert "last.ckpt still links the newest finite one" in result.stderr
    last = load_checkpoint(run / "checkpoints" / "last.ckpt")
    best = load_checkpoint(run / "checkpoints" / "best.ckpt")
    assert last["global_step"] == 10 and not (run / "checkpoints" / "step-000020.ckpt").exists()
    for checkpoint in (last, best):
        assert all(w.isfinite().all() for w in checkpoint["state_dict"].values())


def test_a_non_finite_loss_is_never_the_best(tmp_path):
    from lmtrain.callbacks import BestCheckpoint

    best = BestCheckpoint(dirpath=tmp_path, monitor="val/loss", mode="min", save_top_k=1)
    trainer = type("Trainer", (), {"strategy": None})()
    assert not best.check_monitor_top_k(trainer, torch.tensor(float("nan")))
    assert best.check_monitor_top_k(trainer, torch.tensor(3.0))  # the first finite value is the best so far


def test_an_interrupted_write_leaves_the_previous_checkpoint(tmp_path):
    target = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(3)}, "optimizer_states": []}, target)

    def crash(f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt  # the process dies mid-write

    from lmtrain.fileio import atomic_write

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, crash)
    # a SIGKILL leaves the temporary file behind: it is never taken for a checkpoint
    (tmp_path / ".step-000020.ckpt.tmp-999").write_bytes(b"garbage")
    assert torch.equal(load_checkpoint(target)["state_dict"]["w"], torch.ones(3))
    folder = tmp_path / "run"
    (folder / "checkpoints").mkdir(parents=True)
    os.replace(target, folder / "checkpoints" / "last.ckpt")
    assert resolve_ckpt_path("last", folder).endswith("last.ckpt")


def test_disk_full_is_a_clear_error_and_the_previous_checkpoint_stays(tmp_path, monkeypatch):
    target = tmp_path / "step-000020.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.zeros(2)}}, target)
    before = target.read_bytes()

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(UserError, match="the disk is full; free some space.*previous file is intact"):
        io.save_checkpoint({"state_dict": {"w": torch.ones(2)}}, target)
    assert target.read_bytes() == before
    assert list(tmp_path.iterdir()) == [target]  # no temporary file left


def run_in_process(tmp_path, *overrides):
    cfg = compose(
        "experiment=smoke",
        f"output_dir={tmp_path}",
        "trainer.max_steps=30",
        "trainer.eval_interval=10",
        "callbacks.progress_bar=null",
        "callbacks.model_summary=null",
        "trainer.log_every_n_steps=1",
        *overrides,
    )
    with process_state_kept():
        return train(cfg)


@pytest.mark.parametrize("optimizer", ["optim.fused=false", "optim.fused=true"])  # host check; found_inf
def test_a_nan_loss_skips_the_update_and_is_counted(tmp_path, monkeypatch, optimizer):
    from lmtrain import module as module_lib

    original = module_lib.LanguageModel.training_step

    def poisoned(self, batch, batch_idx):
        loss = original(self, batch, batch_idx)
        return loss * float("nan") if self.global_step in (12, 20) else loss

    monkeypatch.setattr(module_lib.LanguageModel, "training_step", poisoned)
    run_in_process(tmp_path, optimizer)
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert all(torch.isfinite(t).all() for t in last["state_dict"].values())
    counts = dict(scalars(tmp_path)["train/nonfinite_steps"])
    assert counts[11] == 0 and counts[12] == 1 and counts[20] == 2 and counts[29] == 2


class _ReadLater:
    """Stands in for the CUDA event of a copy to the host: the values are written one interval later."""

    def synchronize(self) -> None:
        pass


def test_train_metrics_written_one_interval_later_are_the_same_points(tmp_path, monkeypatch):
    from lmtrain import module as module_lib

    run_in_process(tmp_path / "now")
    monkeypatch.setattr(module_lib, "copy_to_host_async", lambda values: (values.clone(), _ReadLater()))
    run_in_process(tmp_path / "later")  # as on a GPU: each interval's values are written at the next one
    now, later = scalars(tmp_path / "now"), scalars(tmp_path / "later")
    for tag in ("train/loss", "train/grad_norm", "train/nonfinite_steps"):
        assert len(now[tag]) == 30 and sorted(later[tag]) == sorted(now[tag])  # the last at the end of training


def test_non_finite_steps_in_a_row_stop_the_run_with_a_clear_message(tmp_path, monkeypatch):
    from lmtrain import module as module_lib

    original = module_lib.LanguageModel.training_step
    monkeypatch.setattr(
        module_lib.LanguageModel,
        "training_step",
        lambda self, b, i: original(self, b, i) * (float("inf") if self.global_step >= 22 else 1.0),
    )
    with pytest.raises(UserError, match="3 optimizer steps in a row.*max_nonfinite_steps=3"):
        run_in_process(tmp_path, "trainer.max_nonfinite_steps=3")
    last = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 20  # the last good checkpoint is kept
    assert all(torch.isfinite(t).all() for t in last["state_dict"].values())


VALUES = st.one_of(
    st.integers(-3, 300), st.floats(-1.0, 2.0, allow_nan=False), st.sampled_from(["abc", "null", "1e-3"])
)
KEYS = [
    "model.n_layer",
    "model.n_head",
    "model.n_embd",
    "model.block_size",
    "model.dropout",
    "optim.max_lr",
    "optim.min_lr",
    "optim.warmup_steps",
    "trainer.batch_size",
    "trainer.accumulate_grad_batches",
    "trainer.eval_batches",
    "data.val_fraction",
    "trainer.gradient_clip_val",
    "model.mlp",
]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(KEYS), VALUES, min_size=1, max_size=3))
def test_any_override_trains_or_is_refused_with_a_user_error(tmp_path_factory, overrides):
    args = [f"{k}={v}" for k, v in overrides.items()]
    try:
        run_in_process(tmp_path_factory.mktemp("prop"), *args, "trainer.max_steps=3", "trainer.eval_batches=1")
    except (UserError, HydraException, OmegaConfBaseException) as err:
        assert str(err).strip()  # refused, with a message (the CLI prints it as one line, exit 2)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_damaged_tokenizer_and_checkpoint_files_are_user_errors(tmp_path_factory, data):
    folder = tmp_path_factory.mktemp("damaged")
    tokenizer = BPETokenizer([(104, 101), (116, 104)], "gpt2", {"<|endoftext|>": 258})
    tokenizer_file = tokenizer.save(folder / "tok.json")
    checkpoint_file = folder / "x.ckpt"
    AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.arange(4.0)}, "global_step": 3}, checkpoint_file)
    for path, load in ((tokenizer_file, BPETokenizer.load), (checkpoint_file, load_checkpoint)):
        raw = bytearray(path.read_bytes())
        cut = data.draw(st.integers(0, len(raw)))
        flips = data.draw(st.lists(st.integers(0, max(0, cut - 1)), max_size=4)) if cut else []
        damaged = raw[:cut]
        for i in flips:
            damaged[i] ^= 0xFF
        atomic_write_bytes(path, bytes(damaged))
        try:
            load(path)
        except UserError as err:
            assert str(path) in str(err) or "tokenizer" in str(err)


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.vocab_size=100000000000", "M parameters, whose training state needs"),  # refused before allocating
        ("trainer.batch_size=1000000000000", "trainer.batch_size=1000000000000 windows of 64 tokens need at least"),
    ],
)
def test_sizes_beyond_the_memory_are_one_line_naming_the_setting(tmp_path, override, message):
    result = train_here(tmp_path / "run", "experiment=smoke", override)
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_an_allocation_failing_during_training_is_one_line_and_keeps_the_checkpoints(tmp_path, monkeypatch):
    """A batch that passes the estimate yet does not fit (the estimate is a lower bound): the same advice, after
    the steps taken, and the checkpoints written before it stay."""
    from lmtrain.module import LanguageModel

    step = LanguageModel.training_step

    def fails_at_step_20(self, batch, index):
        if self.trainer.global_step == 20:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 GiB")
        return step(self, batch, index)

    monkeypatch.setattr(LanguageModel, "training_step", fails_at_step_20)
    result = train_here(tmp_path / "run", "experiment=smoke")
    assert result.returncode == 2, result.stderr
    assert "out of memory after step 20 with trainer.batch_size=16 and block size 64" in result.stderr
    assert (tmp_path / "run" / "checkpoints" / "step-000020.ckpt").exists()
