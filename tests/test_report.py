"""`lmtrain.report` on a multirun and on a single run; the warmup ablation and Optuna sweeps compose."""

from __future__ import annotations

import re
from pathlib import Path

import matplotlib.image
import pytest
import yaml

from lmtrain.cli import CONFIG_DIR
from lmtrain.report import diverged, find_runs, spikes

from .conftest import compose, run_cli


@pytest.fixture(scope="module")
def multirun(tmp_path_factory):
    folder = tmp_path_factory.mktemp("multirun") / "mr"
    result = run_cli(
        "lmtrain.train",
        "-m",
        "experiment=smoke",
        "trainer.max_steps=40",
        "optim.warmup_steps=0,5",
        f"hydra.sweep.dir={folder}",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return folder


def test_multirun_report_has_a_row_per_run_and_a_png(multirun):
    result = run_cli("lmtrain.report", str(multirun))
    assert result.returncode == 0, result.stderr
    table = [line for line in (multirun / "report.md").read_text().splitlines() if line.startswith("| ")]
    rows = table[1:]
    assert len(rows) == 2
    assert "optim.warmup_steps=0" in rows[0] and "optim.warmup_steps=5" in rows[1]
    assert all("| no |" in row for row in rows)  # neither diverged
    image = matplotlib.image.imread(multirun / "report.png")
    assert image.shape[0] > 200 and image.shape[1] > 400


def test_tensorboard_lists_each_job_by_its_overrides_and_report_finds_them(multirun, tmp_path):
    """TensorBoard names a run by its event files' folder: <job>/tb/<the job's overrides>, not <job>/tb."""
    import shutil

    from tensorboard.backend.event_processing.event_multiplexer import EventMultiplexer

    runs = EventMultiplexer().AddRunsFromDirectory(str(multirun)).Reload().Runs()
    names = [f"{job}/tb/smoke,trainer.max_steps=40,optim.warmup_steps={warmup}" for job, warmup in ((0, 0), (1, 5))]
    assert sorted(runs) == names
    assert all("val/loss" in tags["scalars"] for tags in runs.values())
    assert [run.path for run in find_runs(multirun)] == [multirun / "0", multirun / "1"]

    old = tmp_path / "old"  # a run written before runs had names: its event files in tb/ itself
    shutil.copytree(multirun / "0", old / "0")
    for event_file in (old / "0").glob("tb/*/events.out.tfevents.*"):
        event_file.rename(old / "0" / "tb" / event_file.name)
    assert [run.path for run in find_runs(old)] == [old / "0"]


def test_single_run_report_remeasures_the_lessons_table_and_checklist(multirun):
    run = multirun / "0"
    result = run_cli("lmtrain.report", str(run))
    assert result.returncode == 0, result.stderr
    text = (run / "report.md").read_text()
    assert "| 0 | " in text and "re-measured" in text
    for check in ("within 2000 steps (nats per token)", "gap < 0.5", "character names"):
        assert check in text
    assert ("| pass |" in text) or ("| FAIL |" in text)


def test_report_on_an_empty_folder_is_a_clear_error(tmp_path):
    result = run_cli("lmtrain.report", str(tmp_path))
    assert result.returncode == 2 and "no runs" in result.stderr


def test_spikes_and_divergence_detection():
    smooth = [(i, 3.0 - i * 0.01) for i in range(30)]
    spiky = smooth[:20] + [(20, 9.0)] + smooth[21:]
    assert spikes(smooth) == [] and spikes(spiky) == [20]
    assert not diverged(smooth) and diverged(smooth + [(30, float("nan"))]) and diverged([(0, 2.0), (1, 5.0)])


def test_warmup_ablation_sweeps_the_lessons_grid():
    cfg = compose("experiment=warmup_ablation")
    assert cfg.name == "warmup_ablation" and cfg.model.n_layer in (6, 2)  # GPU- or CPU-sized, as make train picks
    experiment = yaml.safe_load((Path(CONFIG_DIR) / "experiment" / "warmup_ablation.yaml").read_text())
    assert experiment["hydra"]["sweeper"]["params"] == {"optim.warmup_steps": "200,0", "optim.max_lr": "3e-4,1e-3"}


def test_optuna_search_minimises_best_val_loss(tmp_path):
    """The command written in conf/hparams_search/optuna.yaml, as written (into a folder of the test's)."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    written = (Path(CONFIG_DIR) / "hparams_search" / "optuna.yaml").read_text()
    command = re.search(r"^#\s+python -m lmtrain\.train (.*)$", written, flags=re.M).group(1).split()
    folder = tmp_path / "optuna"
    result = run_cli("lmtrain.train", *command, f"hydra.sweep.dir={folder}")
    assert result.returncode == 0, result.stderr[-2000:]
    results = yaml.safe_load((folder / "optimization_results.yaml").read_text())
    assert set(results["best_params"]) == {"optim.max_lr", "optim.warmup_steps", "model.dropout"}
    assert 0 < results["best_value"] < 10
    trials = sorted(p.parent.parent for p in folder.glob("*/.hydra/config.yaml"))
    assert len(trials) == int(re.search(r"hydra\.sweeper\.n_trials=(\d+)", " ".join(command)).group(1))
    for trial in trials:
        assert (trial / "summary.json").is_file()
        optim = yaml.safe_load((trial / ".hydra" / "config.yaml").read_text())["optim"]
        assert optim["min_lr"] == pytest.approx(optim["max_lr"] * 0.1)  # recorded as the number it ran with


def test_damaged_files_are_reported_as_damaged_not_read_as_a_wrong_best(multirun, tmp_path):
    """TensorBoard's reader stops silently at a truncated record: the best loss read from what is left is not the
    run's best, so the report says so, as for an unreadable overrides.yaml or samples.txt."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(multirun / "0", run)
    (run / "report.md").unlink(missing_ok=True)
    events = max(run.glob("tb/*/events.out.tfevents.*"), key=lambda p: p.stat().st_size)
    whole = events.read_bytes()
    events.write_bytes(whole[: len(whole) * 2 // 3])
    (run / ".hydra" / "overrides.yaml").write_text("- trainer.max_steps=40\n- [unclosed\n")
    (run / "samples.txt").write_bytes(b"=== step 10 ===\n\xff\xfe not text")
    result = run_cli("lmtrain.report", str(run))
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 3, result.stderr
    assert any(f"{events.relative_to(run)} is damaged after byte" in w for w in warnings)
    assert any("overrides.yaml could not be read" in w for w in warnings)
    assert any("samples.txt could not be read" in w for w in warnings)
    report = (run / "report.md").read_text()
    assert "## Files that could not be read whole" in report and "points after it are missing" in report

    shutil.copy(multirun / "0" / ".hydra" / "overrides.yaml", run / ".hydra" / "overrides.yaml")
    (run / "samples.txt").write_text("=== step 10 ===\nROMEO:\n")
    events.write_bytes(whole)  # whole again: no warning
    result = run_cli("lmtrain.report", str(run))
    assert result.returncode == 0 and "warning" not in result.stderr, result.stderr
