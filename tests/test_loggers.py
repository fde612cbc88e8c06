"""logger=csv, logger=wandb (offline) and logger=mlflow (a local SQLite store): a short run logged with each and
read back with that library's own reader holds the points TensorBoard gets, the best val/loss of summary.json and
every hyperparameter; a logger whose package is missing is one line naming the extra."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import compose, process_state_kept, scalars, smoke_here, train_here

RUN = ("trainer.max_steps=20", "trainer.eval_interval=10", "trainer.log_every_n_steps=10")
TIMED = {"train/tokens_per_s", "hparams/tokens_per_s"}  # a measurement: its steps must agree, not its values
Series = dict[str, list[tuple[int, float]]]
WANDB_ENV = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_ERROR_REPORTING": "false"}  # no network


@pytest.fixture(scope="module")
def tensorboard(tmp_path_factory) -> Series:
    """The same run with the default logger, read with TensorBoard's reader: what every logger must hold."""
    run = tmp_path_factory.mktemp("tensorboard")
    smoke_here(run, *RUN)
    return scalars(run)


def hyperparameters(run: Path, logger: str) -> dict:
    """What lmtrain gives the logger: the resolved config, flattened, without the callbacks."""
    from lmtrain import build
    from lmtrain.config import to_container

    with process_state_kept():
        cfg = compose("experiment=smoke", *RUN, f"logger={logger}", f"output_dir={run}")
    return {k: v for k, v in build._flatten(to_container(cfg)).items() if not k.startswith("callbacks.")}


def check_metrics(logged: Series, tensorboard: Series, run: Path) -> None:
    assert set(logged) == set(tensorboard), "the logger got other metric names than TensorBoard"
    for tag, points in tensorboard.items():
        if tag == "val/loss_best":  # TensorBoard's also has a NaN at step 0: the HPARAMS tab's registration
            points = [(step, value) for step, value in points if not math.isnan(value)]
        got = sorted(logged[tag])
        assert [step for step, _ in got] == [step for step, _ in points], tag
        if tag not in TIMED:
            assert [value for _, value in got] == pytest.approx([value for _, value in points], rel=1e-6), tag
    assert [step for step, _ in logged["val/loss"]] == [0, 10, 20]  # at the start, every 10 steps
    assert len(logged["train/loss"]) == 2
    summary = json.loads((run / "summary.json").read_text())
    step, best = min(logged["val/loss"], key=lambda point: point[1])
    assert (step, best) == (summary["best_step"], pytest.approx(summary["best_val_loss"], rel=1e-6))
    assert logged["val/loss_best"][-1][1] == pytest.approx(summary["best_val_loss"], rel=1e-6)


def read_csv_metrics(path: Path) -> Series:
    logged: Series = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):  # a row per logging call: its step and the metrics it logged
            step = int(row.pop("step"))
            for tag, value in row.items():
                if value != "":
                    logged.setdefault(tag, []).append((step, float(value)))
    return logged


def test_csv_logger(tmp_path, tensorboard):
    from lightning.pytorch.core.saving import load_hparams_from_yaml

    smoke_here(tmp_path, "logger=csv", *RUN)
    (version,) = (tmp_path / "csv").iterdir()
    assert version.name == "version_0"
    check_metrics(read_csv_metrics(version / "metrics.csv"), tensorboard, tmp_path)
    assert load_hparams_from_yaml(str(version / "hparams.yaml")) == hyperparameters(tmp_path, "csv")

    # A resumed run writes the next version: Lightning would empty the metrics.csv of a version it reopens.
    first = (version / "metrics.csv").read_text()
    resume = ("trainer.max_steps=30", f"ckpt_path={tmp_path / 'checkpoints' / 'last.ckpt'}")
    smoke_here(tmp_path, "logger=csv", *RUN, *resume)
    assert (version / "metrics.csv").read_text() == first
    resumed = read_csv_metrics(tmp_path / "csv" / "version_1" / "metrics.csv")
    assert [step for step, _ in resumed["val/loss"]] == [30]


def test_wandb_logger_offline(tmp_path, tensorboard, monkeypatch):
    pytest.importorskip("wandb", reason="the optional extra .[loggers]")
    import wandb

    for name, value in WANDB_ENV.items():
        monkeypatch.setenv(name, value)
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))
    try:
        smoke_here(tmp_path / "run", "logger=wandb", *RUN)
    finally:
        wandb.finish()  # writes the run's last records; lmtrain's CLI does it at exit
    (log,) = (tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb")
    read = subprocess.run(  # wandb's reader of its transaction log: one JSON record per line
        [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(log)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert read.returncode == 0, read.stderr
    records = [json.loads(line) for line in read.stdout.splitlines() if line.strip()]
    logged: Series = {}
    config: dict = {}
    for record in records:
        if record["type"] == "history":  # x = trainer/global_step, wandb's own _step counts the calls
            item = record["history"]["item"]
            step = item.pop("trainer/global_step")
            for tag, value in item.items():
                if not tag.startswith("_"):
                    logged.setdefault(tag, []).append((step, value))
        elif record["type"] == "run":  # wandb.init's config, then each config.update
            config.update(record["run"]["config"]["update"])
        elif record["type"] == "config":
            config.update(record["config"]["update"])
    run_record = next(record["run"] for record in records if record["type"] == "run")
    assert (run_record["project"], run_record["display_name"]) == ("lmtrain", "smoke")
    check_metrics(logged, tensorboard, tmp_path / "run")
    config.pop("_wandb", None)
    assert config == hyperparameters(tmp_path / "run", "wandb")


def test_each_job_of_a_sweep_gets_its_own_wandb_run(tmp_path, monkeypatch):
    """Hydra's basic launcher runs a sweep's jobs in one process, where Lightning's WandbLogger would log into the
    run of the job before (wandb.run, still open): build_logger finishes it."""
    pytest.importorskip("wandb", reason="the optional extra .[loggers]")
    import wandb

    from lmtrain import build

    for name, value in WANDB_ENV.items():
        monkeypatch.setenv(name, value)
    earlier = wandb.init(mode="offline", dir=str(tmp_path), project="lmtrain")
    try:
        with process_state_kept():
            cfg = compose("experiment=smoke", "logger=wandb", f"output_dir={tmp_path / 'job'}")
            (tmp_path / "job").mkdir()
            logger = build.build_logger(cfg)
            assert logger.experiment.id != earlier.id
            assert Path(logger.experiment.dir).is_relative_to(tmp_path / "job")
    finally:
        wandb.finish()


def test_mlflow_logger_local_store(tmp_path, tensorboard, monkeypatch):
    pytest.importorskip("mlflow", reason="the optional extra .[loggers]")
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    smoke_here(tmp_path, "logger=mlflow", *RUN)
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("lmtrain")
    (run,) = client.search_runs([experiment.experiment_id])
    assert (run.info.run_name, run.info.status) == ("smoke", "FINISHED")
    logged = {
        tag: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, tag)] for tag in run.data.metrics
    }
    check_metrics(logged, tensorboard, tmp_path)
    assert run.data.params == {k: str(v) for k, v in hyperparameters(tmp_path, "mlflow").items()}


@pytest.mark.parametrize("module,flag", [("wandb", "_WANDB_AVAILABLE"), ("mlflow", "_MLFLOW_AVAILABLE")])
def test_a_missing_logger_package_is_one_line_naming_the_extra(tmp_path, monkeypatch, module, flag):
    """What Lightning does without the package: its availability check fails and the logger raises."""
    from lightning_utilities.core.imports import RequirementCache

    monkeypatch.setattr(f"lightning.pytorch.loggers.{module}.{flag}", RequirementCache(f"{module}>=999"))
    result = train_here(tmp_path, "experiment=smoke", f"logger={module}", *RUN)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert f"Requirement '{module}>=999' not met" in result.stderr
    assert result.stderr.rstrip().endswith("pip install -e '.[loggers]'")
    assert not (tmp_path / "checkpoints").exists()


def test_tensorboard_run_names_tell_runs_apart_and_are_file_names(tmp_path):
    from lmtrain.loggers import MAX_NAME_BYTES, run_folder_name

    assert run_folder_name("smoke", []) == "smoke"
    assert run_folder_name("smoke", ["experiment=smoke", "trainer.max_steps=500"]) == "smoke,trainer.max_steps=500"
    sweep_job = ["optim.warmup_steps=0", "optim.max_lr=3e-4"]
    assert run_folder_name("default", sweep_job) == "optim.warmup_steps=0,optim.max_lr=3e-4"
    assert run_folder_name("x", ["data.path=/home/me/my text.txt"]) == "data.path=_home_me_my_text.txt"
    assert run_folder_name("..", []) == "_."
    long = [f"callbacks.sample_text.prompts=['{'é' * 300}']"]
    one, two = run_folder_name("x", [*long, "seed=1"]), run_folder_name("x", [*long, "seed=2"])
    assert one != two and len(one.encode()) <= MAX_NAME_BYTES
    for name in (one, "data.path=_home_me_my_text.txt"):
        (tmp_path / name).mkdir()  # one folder, not a path
        assert [p.name for p in tmp_path.glob("*") if p.name == name] == [name]


def test_a_resumed_run_continues_the_tensorboard_run_in_its_folder(tmp_path, monkeypatch):
    """Resumed with other overrides (a longer run), a run's curves stay one TensorBoard run; a run written before
    runs had names (its event files in tb/ itself) goes on there."""
    from hydra.core.hydra_config import HydraConfig
    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    from lmtrain.loggers import TensorBoard

    monkeypatch.setattr(HydraConfig.instance(), "cfg", None)  # outside a Hydra run: named by run_name alone
    for step, run_name in enumerate(("smoke", "smoke-resumed")):
        logger = TensorBoard(str(tmp_path / "run"), run_name=run_name)
        logger.log_metrics({"val/loss": 3.0 - step}, step=step)
        logger.finalize("success")
    old = tmp_path / "old"
    (old / "tb").mkdir(parents=True)
    for event_file in (tmp_path / "run" / "tb" / "smoke").glob("events.out.tfevents.*"):
        event_file.rename(old / "tb" / event_file.name)
    assert Path(TensorBoard(str(old), run_name="smoke").log_dir) == old / "tb"
    runs = EventMultiplexer().AddRunsFromDirectory(str(tmp_path)).Reload()
    assert sorted(runs.Runs()) == ["old/tb"]
    assert [(e.step, e.value) for e in runs.Scalars("old/tb", "val/loss")] == [(0, 3.0), (1, 2.0)]
