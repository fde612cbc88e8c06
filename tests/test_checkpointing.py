"""Loading a checkpoint never runs code from it: crafted pickles are refused, one line, before any of it runs."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from lmtrain.checkpointing import load_checkpoint
from lmtrain.errors import UserError

from .conftest import run_cli, smoke_here, train_here


class Payload:
    """What an attacker's checkpoint holds: unpickling it calls os.system."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def crafted(folder, name: str, zipped: bool = True):
    """A file that looks like a checkpoint and runs `touch <folder>/ran` when unpickled in general."""
    path, marker = folder / name, folder / "ran"
    content = {"state_dict": {}, "hyper_parameters": {}, "payload": Payload(marker)}
    if zipped:
        torch.save(content, path)
    else:
        path.write_bytes(pickle.dumps(content))
    return path, marker


@pytest.mark.parametrize("zipped", [True, False])  # torch.save's zip format, or a raw pickle
@pytest.mark.parametrize("mmap", [False, True])
def test_a_crafted_checkpoint_is_refused_without_running_its_code(tmp_path, zipped, mmap):
    path, marker = crafted(tmp_path, "evil.ckpt", zipped)
    with pytest.raises(UserError, match="evil.ckpt") as err:
        load_checkpoint(path, mmap=mmap)
    assert not marker.exists()
    if zipped and not mmap:
        assert "refused without running any of its code" in str(err.value) and "posix.system" in str(err.value)


def test_lmtrains_own_checkpoints_load_through_the_safe_unpickler(tmp_path):
    smoke_here(
        tmp_path, "trainer.max_steps=4", "optim.warmup_steps=2", "trainer.eval_interval=2", "checkpoint.every_n_steps=2"
    )
    for path in (tmp_path / "checkpoints").glob("*.ckpt"):
        checkpoint = load_checkpoint(path)
        assert checkpoint["state_dict"] and "tokenizer_state" in checkpoint["hyper_parameters"], path.name


def test_training_and_sampling_refuse_a_crafted_checkpoint(tmp_path):
    path, marker = crafted(tmp_path, "evil.ckpt")
    result = train_here(tmp_path / "run", "experiment=smoke", f"ckpt_path={path}")
    assert result.returncode == 2 and "refused without running" in result.stderr
    sampled = run_cli("lmtrain.sample", f"ckpt_path={path}")
    assert sampled.returncode == 2 and "refused without running" in sampled.stderr
    assert "Traceback" not in sampled.stderr and not marker.exists()


def test_ckpt_path_last_resumes_the_highest_step_whatever_the_file_times(tmp_path):
    from lmtrain.checkpointing import newest_matching_run, resolve_ckpt_path

    from .conftest import compose

    run = tmp_path / "run"
    smoke_here(run, "trainer.max_steps=30", "checkpoint.every_n_steps=10", "checkpoint.keep_last=3")
    folder = run / "checkpoints"
    newest = folder / "step-000030.ckpt"
    assert resolve_ckpt_path("last", run) == str(newest)
    (folder / "step-000010.ckpt").touch()  # newest by time, oldest by step
    (folder / "copy.ckpt").write_bytes((folder / "step-000020.ckpt").read_bytes())
    assert resolve_ckpt_path("last", run) == str(newest)
    newest.unlink()  # last.ckpt now dangles
    assert resolve_ckpt_path("last", run) == str(folder / "step-000020.ckpt")
    broken = tmp_path / "outputs" / "broken"
    (broken / ".hydra").mkdir(parents=True)
    (broken / ".hydra" / "config.yaml").write_text("model: [unclosed")
    (broken / "checkpoints").mkdir()
    assert newest_matching_run(compose("experiment=smoke"), tmp_path / "outputs") is None


def test_ckpt_path_last_finds_a_run_recorded_with_precision_auto(tmp_path):
    """Its .hydra/config.yaml says `auto`, the config to resume is validated (auto resolved): they still match."""
    from omegaconf import OmegaConf

    from lmtrain.checkpointing import newest_matching_run
    from lmtrain.config import validate

    from .conftest import compose

    run = tmp_path / "outputs" / "2026-12-02" / "10-00-00"
    (run / ".hydra").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "step-000010.ckpt").write_bytes(b"")
    recorded = compose("experiment=seed_char", "ckpt_path=last")
    assert recorded.trainer.precision == "auto"
    OmegaConf.save(recorded, run / ".hydra" / "config.yaml")
    cfg = compose("experiment=seed_char", "ckpt_path=last")
    validate(cfg)
    assert cfg.trainer.precision != "auto" and newest_matching_run(cfg, tmp_path / "outputs") == run
