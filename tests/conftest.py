"""Shared fixtures: offline data from the mirror, a private cache, Hydra composition, CLI runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels (model.fused_loss) run in its interpreter; set before import
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]
MIRROR = Path(os.environ.get("LMTRAIN_DATA_MIRROR") or REPO.parent / "shared" / "data")
SHAKESPEARE = MIRROR / "tinyshakespeare.txt"


@pytest.fixture(scope="session", autouse=True)
def offline_data(tmp_path_factory):
    """Every test reads data from the mirror and caches into a fresh folder: nothing touches the network."""
    assert SHAKESPEARE.is_file(), f"the data mirror {MIRROR} is missing (set LMTRAIN_DATA_MIRROR)"
    os.environ["LMTRAIN_DATA_MIRROR"] = str(MIRROR)
    os.environ["LMTRAIN_CACHE"] = str(tmp_path_factory.mktemp("lmtrain-cache"))
    os.environ.pop("TIKTOKEN_CACHE_DIR", None)


def compose(*overrides: str, config_name: str = "train"):
    """The config `python -m lmtrain.train <overrides>` would run with."""
    from lmtrain.cli import compose as cli_compose

    return cli_compose(config_name, overrides)


def run_cli(module: str, *args: str, timeout: float = 240, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m <module> <args>` from the repository root, as a user would type it."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )


def smoke(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    """The smoke experiment into run_dir; fails the test with the run's output if it fails."""
    result = run_cli("lmtrain.train", "experiment=smoke", f"hydra.run.dir={run_dir}", *overrides)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every TensorBoard scalar of a run, read with TensorBoard's own reader: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    series: dict[str, list[tuple[int, float]]] = {}
    for folder in sorted({p.parent for p in run_dir.rglob("events.out.tfevents.*")}):
        reader = EventAccumulator(str(folder), purge_orphaned_data=False)  # a resumed run keeps every point
        reader.Reload()
        for tag in reader.Tags()["scalars"]:
            series.setdefault(tag, []).extend((e.step, e.value) for e in reader.Scalars(tag))
    return series
