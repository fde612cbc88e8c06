"""Shared fixtures: offline data from the mirror, a private cache, Hydra composition, CLI runs."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels (fast.loss=fused) run in its interpreter; set before import
    os.environ.setdefault("TRITON_INTERPRET", "1")

if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):  # `-n N`: the workers share the cores, so each gets its share of
    # threads, in-process runs and the runs they start: a BLAS thread without its own core spins (~5x slower)
    _THREADS = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    torch.set_num_threads(_THREADS)
    os.environ.setdefault("OMP_NUM_THREADS", str(_THREADS))

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


@contextmanager
def process_state_kept():
    """Puts back what a run inside the pytest process changes, so that in-process runs cannot leak into each
    other: signal handlers, float32 matmul precision, every RNG, the environment (PL_GLOBAL_SEED,
    HYDRA_FULL_ERROR, ...), the working directory, torch's thread count and Hydra's global state."""
    import random

    import numpy as np
    from hydra.core.global_hydra import GlobalHydra

    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    precision, threads = torch.get_float32_matmul_precision(), torch.get_num_threads()
    environ, cwd = dict(os.environ), os.getcwd()
    rngs = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    cuda_rngs = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    GlobalHydra.instance().clear()
    try:
        yield
    finally:
        GlobalHydra.instance().clear()
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        torch.set_float32_matmul_precision(precision)
        torch.set_num_threads(threads)
        os.environ.clear()
        os.environ.update(environ)
        os.chdir(cwd)
        random.setstate(rngs[0])
        np.random.set_state(rngs[1])
        torch.random.set_rng_state(rngs[2])
        if cuda_rngs is not None:
            torch.cuda.set_rng_state_all(cuda_rngs)


@dataclass
class InProcessRun:
    """What `python -m lmtrain.train ...` would have ended with: exit code, printed output, the error line."""

    returncode: int
    stdout: str
    stderr: str
    error: BaseException | None = None
    best: float | None = None


def train_here(run_dir: Path, *overrides: str) -> InProcessRun:
    """`python -m lmtrain.train <overrides> hydra.run.dir=<run_dir>` inside the pytest process (no second import
    of torch and Lightning): a UserError, or a bad override, is the CLI's exit 2 with its `error: ...` line, a
    stop by signal its exit 128 + the signal, any other exception fails the test with its traceback.
    `ckpt_path=last` needs Hydra's run: use `smoke`."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from lmtrain.errors import StoppedBySignal, UserError, describe_hydra_error, one_line
    from lmtrain.train import train

    printed = io.StringIO()
    with process_state_kept():
        try:
            with redirect_stdout(printed):
                cfg = compose(*overrides, f"output_dir={run_dir}")
                best = train(cfg)
        except UserError as err:
            return InProcessRun(2, printed.getvalue(), f"error: {one_line(err)}\n", err)
        except StoppedBySignal as stop:
            return InProcessRun(128 + stop.signum, printed.getvalue() + str(stop), "", stop)
        except (HydraException, OmegaConfBaseException) as err:
            return InProcessRun(2, printed.getvalue(), f"error: {describe_hydra_error(err)}\n", err)
        finally:
            sys.stdout.write(printed.getvalue())  # into pytest's report of a failing test
    return InProcessRun(0, printed.getvalue(), "", None, best)


def smoke_here(run_dir: Path, *overrides: str) -> InProcessRun:
    """`smoke` inside the pytest process: for tests that need a run's files or outcome, not its process."""
    result = train_here(run_dir, "experiment=smoke", *overrides)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
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
