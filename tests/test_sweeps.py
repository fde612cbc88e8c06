"""A multirun survives its failed jobs (the basic sweeper and Optuna), and a run records the values it ran with."""

from __future__ import annotations

import io
import json
import sys
from contextlib import redirect_stderr

import pytest
import yaml
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from lmtrain.cli import command
from lmtrain.errors import UserError

from .conftest import process_state_kept, run_cli

JOB_ERRORS: dict[int, Exception] = {}  # what `task` raises, by job number
RAN: list[int] = []  # the jobs `task` ran, in order
SEEN: list[dict] = []  # the config each job ran with


def task(cfg) -> float:
    """A stand-in for lmtrain.train's task: fails as JOB_ERRORS says, else returns 10 - its job number."""
    num = OmegaConf.select(HydraConfig.get(), "job.num", default=0)  # a single run has none
    RAN.append(num)
    SEEN.append(OmegaConf.to_container(cfg, resolve=False))
    if num in JOB_ERRORS:
        raise JOB_ERRORS[num]
    return 10.0 - num


def run_here(monkeypatch, *args: str, job_errors: dict[int, Exception] | None = None) -> tuple[int, str]:
    """`python -m lmtrain.train <args>` with `task` for its task, inside the pytest process: exit code, stderr."""
    monkeypatch.setattr(sys.modules[__name__], "JOB_ERRORS", job_errors or {})
    RAN.clear()
    SEEN.clear()
    stderr = io.StringIO()
    quiet = ("hydra/job_logging=none", "hydra/hydra_logging=none")  # no log handlers left in the pytest process
    with process_state_kept(), redirect_stderr(stderr):
        monkeypatch.setattr(sys, "argv", ["train.py", *args, *quiet])
        try:
            command(task, config_name="train")()
        except SystemExit as stop:
            return stop.code, stderr.getvalue()
    return 0, stderr.getvalue()


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


def test_a_bad_job_is_recorded_the_others_run_and_the_sweep_exits_2_naming_it(tmp_path):
    """The contract of ../shared/acceptance/terminal-and-sweeps, part 4, with lmtrain.train itself."""
    sweep = tmp_path / "sw"
    result = run_cli(
        "lmtrain.train",
        "-m",
        "experiment=smoke",
        "trainer.max_steps=10",
        "trainer.eval_interval=5",
        "trainer.batch_size=8,0,4",
        f"hydra.sweep.dir={sweep}",
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert (sweep / "0" / "summary.json").is_file() and (sweep / "2" / "summary.json").is_file()
    job_error = "error: trainer.batch_size=0 must be at least 1"
    assert error_lines(result.stderr) == [
        job_error,
        f"error: 1 of 3 jobs failed (recorded in {sweep / 'failed_jobs.json'}): "
        "job 1 (trainer.batch_size=0): trainer.batch_size=0 must be at least 1",
    ]
    assert (sweep / "1" / "train.log").read_text().splitlines()[-1] == job_error
    assert json.loads((sweep / "failed_jobs.json").read_text()) == [
        {
            "job": 1,
            "folder": "1",
            "overrides": [
                "experiment=smoke",
                "trainer.max_steps=10",
                "trainer.eval_interval=5",
                "trainer.batch_size=0",
            ],
            "error": "trainer.batch_size=0 must be at least 1",
            "error_type": "UserError",
        }
    ]
    reported = run_cli("lmtrain.report", str(sweep))  # the sweep's report lists it beside the jobs that ran
    assert reported.returncode == 0, reported.stderr
    assert "## Failed jobs (1)" in reported.stdout and "| 1 | `experiment=smoke" in reported.stdout


def test_a_crashed_job_is_recorded_with_its_traceback_and_the_sweep_exits_1(tmp_path, monkeypatch):
    sweep = tmp_path / "sw"
    code, stderr = run_here(
        monkeypatch, "-m", "seed=1,2,3", f"hydra.sweep.dir={sweep}", job_errors={1: RuntimeError("a bug")}
    )
    assert code == 1 and RAN == [0, 1, 2]
    assert "Traceback (most recent call last)" in stderr and "RuntimeError: a bug" in stderr
    assert error_lines(stderr) == [
        f"error: 1 of 3 jobs failed (recorded in {sweep / 'failed_jobs.json'}): job 1 (seed=2): RuntimeError: a bug"
    ]
    assert [(r["job"], r["error"]) for r in json.loads((sweep / "failed_jobs.json").read_text())] == [
        (1, "RuntimeError: a bug")
    ]
    assert "RuntimeError: a bug" in (sweep / "1" / "test_sweeps.log").read_text()


def test_a_sweep_without_a_failure_exits_0_and_leaves_no_record(tmp_path, monkeypatch):
    (tmp_path / "failed_jobs.json").write_text('[{"job": 7}]')  # an earlier sweep's into the same folder
    code, stderr = run_here(monkeypatch, "-m", "seed=1,2", f"hydra.sweep.dir={tmp_path}")
    assert code == 0 and RAN == [0, 1] and not error_lines(stderr)
    assert not (tmp_path / "failed_jobs.json").exists()


@pytest.fixture
def optuna_study(tmp_path, monkeypatch):
    """The overrides of a 3-trial study of hparams_search=optuna into tmp_path, and the states of its trials."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    import optuna

    studies = []
    create_study = optuna.create_study
    monkeypatch.setattr(optuna, "create_study", lambda **kwargs: studies.append(create_study(**kwargs)) or studies[-1])
    overrides = ["hparams_search=optuna", "hydra.sweeper.n_trials=3", f"hydra.sweep.dir={tmp_path}"]
    return overrides, lambda: [trial.state.name for trial in studies[0].trials]


def test_an_optuna_trial_that_fails_is_told_to_the_study_which_goes_on(tmp_path, monkeypatch, optuna_study):
    overrides, trial_states = optuna_study
    code, stderr = run_here(monkeypatch, *overrides, job_errors={1: UserError("job one is bad")})
    assert code == 2 and RAN == [0, 1, 2]
    assert trial_states() == ["COMPLETE", "FAIL", "COMPLETE"]
    assert yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())["best_value"] == 8.0  # job 2's
    assert error_lines(stderr)[0] == "error: job one is bad"
    assert "1 of 3 jobs failed" in error_lines(stderr)[-1] and "job 1 (optim.max_lr=" in error_lines(stderr)[-1]


def test_an_optuna_study_whose_trials_all_fail_says_so_and_exits_2(tmp_path, monkeypatch, optuna_study):
    overrides, trial_states = optuna_study
    code, stderr = run_here(monkeypatch, *overrides, job_errors={n: UserError(f"bad {n}") for n in range(3)})
    assert code == 2 and RAN == [0, 1, 2] and trial_states() == ["FAIL"] * 3
    lines = error_lines(stderr)
    assert lines[:3] == ["error: bad 0", "error: bad 1", "error: bad 2"]
    assert lines[3] == "error: the sweeper stopped: ValueError: No trials are completed yet."
    assert "3 of 3 jobs failed" in lines[4] and "Traceback" not in stderr


def test_the_run_folder_records_the_values_resolvers_gave(tmp_path, monkeypatch):
    """`${lmtrain.on_gpu:6,2}` is recorded as what it gave on this machine, as the run saw it; `${output_dir}/...`
    stays a reference, so that `ckpt_path=last` can match a run of the same config in another folder."""
    import torch

    code, stderr = run_here(monkeypatch, "experiment=warmup_ablation", f"hydra.run.dir={tmp_path}")
    assert code == 0, stderr
    recorded = yaml.safe_load((tmp_path / ".hydra" / "config.yaml").read_text())
    assert recorded == SEEN[0]
    assert recorded["model"]["n_layer"] == (6 if torch.cuda.is_available() else 2)
    assert recorded["output_dir"] == str(tmp_path)
    assert recorded["callbacks"]["best_checkpoint"]["dirpath"] == "${output_dir}/checkpoints"
