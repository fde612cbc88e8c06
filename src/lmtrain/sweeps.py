"""A multirun survives its failed jobs: each is recorded and the others run; the command then names them.

A job's exception is printed (a UserError as its `error: ...` line, anything else as its traceback), appended to
the job's `train.log`, listed in the sweep folder's `failed_jobs.json` and raised again: Hydra marks the job
failed and its sweeper goes on (the basic sweeper to the end of its batch, Optuna telling the study the trial
failed). At the end one line names every failed job, and the command exits 2 if each failed on bad input
(a UserError, the code a single run of it exits with), else 1.

failed_jobs.json, rewritten after each failure: a list of
    {"job": 1, "folder": "1", "overrides": ["experiment=smoke", "trainer.batch_size=0"],
     "error": "trainer.batch_size=0 must be at least 1", "error_type": "UserError"}
where `folder` is the job's folder relative to the sweep folder.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import EXIT_USER_ERROR, FULL_ERROR, UserError, one_line
from .fileio import atomic_write_bytes

FAILED_JOBS = "failed_jobs.json"
EXIT_CRASH = 1  # what Python exits with on an uncaught exception, as a single run of a crashed job does


@dataclass
class FailedJob:
    job: int
    folder: str
    overrides: list[str]
    error: str
    error_type: str


@dataclass
class _Sweep:
    """The multirun of this process: the overrides of every job started, and the failed ones with their error."""

    folder: Path | None = None
    overrides: list[list[str]] = field(default_factory=list)
    failed: list[tuple[FailedJob, BaseException]] = field(default_factory=list)

    def is_a_jobs_error(self, err: BaseException) -> bool:
        return any(err is raised for _, raised in self.failed)

    def summary(self) -> str:
        """How many jobs failed, and each one's number, the overrides that set it apart, and its error."""
        common = set.intersection(*(set(o) for o in self.overrides))
        named = []
        for job, _ in self.failed:
            own = [o for o in job.overrides if o not in common] or job.overrides
            named.append(f"job {job.job} ({' '.join(own)}): {job.error}")
        where = self.folder / FAILED_JOBS
        return f"{len(self.failed)} of {len(self.overrides)} jobs failed (recorded in {where}): " + " | ".join(named)


_sweep = _Sweep()


@contextmanager
def job_failure_recorded() -> Iterator[None]:
    """Around one job of a multirun: an exception is recorded and raised again for Hydra (see the module's
    docstring); HYDRA_FULL_ERROR=1 shows a UserError's traceback too."""
    from hydra.core.hydra_config import HydraConfig

    hydra = HydraConfig.get()
    if _sweep.folder is None:  # the first job: a record left by an earlier sweep into this folder goes
        _sweep.folder = Path(os.path.abspath(os.path.join(hydra.runtime.cwd, hydra.sweep.dir)))
        (_sweep.folder / FAILED_JOBS).unlink(missing_ok=True)
    _sweep.overrides.append(list(hydra.overrides.task))
    try:
        yield
    except Exception as err:
        user_error = isinstance(err, UserError)
        shown = _shown(err, os.environ.get(FULL_ERROR) == "1")
        print(shown, end="", file=sys.stderr, flush=True)
        output_dir = Path(hydra.runtime.output_dir)
        job = FailedJob(
            job=hydra.job.num,
            folder=Path(os.path.relpath(output_dir, _sweep.folder)).as_posix(),
            overrides=_sweep.overrides[-1],
            error=one_line(err) if user_error else f"{type(err).__name__}: {one_line(err)}",
            error_type=type(err).__name__,
        )
        _sweep.failed.append((job, err))
        _write_records(output_dir / f"{hydra.job.name}.log", shown)
        raise


def _shown(err: BaseException, full_error: bool) -> str:
    """A UserError as its `error:` line, anything else (or with HYDRA_FULL_ERROR=1) as its traceback."""
    if isinstance(err, UserError) and not full_error:
        return f"error: {one_line(err)}\n"
    return "".join(traceback.format_exception(err))


def _write_records(log_file: Path, shown: str) -> None:
    """The sweep's failed_jobs.json, and the error as shown into the job's log; a write that fails is a warning,
    not a second error over the job's own."""
    try:
        records = [asdict(job) for job, _ in _sweep.failed]
        atomic_write_bytes(_sweep.folder / FAILED_JOBS, (json.dumps(records, indent=2) + "\n").encode())
        with open(log_file, "a", encoding="utf-8") as log:
            log.write(shown)
    except (OSError, UserError) as err:
        print(f"warning: the failed job's record is incomplete: {one_line(err)}", file=sys.stderr, flush=True)


@contextmanager
def failed_jobs_named(full_error: bool) -> Iterator[None]:
    """Around a command that may run a multirun: if jobs failed, one `error:` line names them and the command exits
    non-zero (see the module's docstring). What a sweeper raises for a failed job is that job's error, shown
    already; anything else it raises after them is shown before that line."""
    global _sweep
    _sweep = _Sweep()
    try:
        yield
    except Exception as err:
        if not _sweep.failed:
            raise
        if not _sweep.is_a_jobs_error(err):  # Optuna asked for the best trial when none completed, ...
            shown = f"error: the sweeper stopped: {type(err).__name__}: {one_line(err)}\n"
            print("".join(traceback.format_exception(err)) if full_error else shown, end="", file=sys.stderr)
    if _sweep.failed:
        print(f"error: {_sweep.summary()}", file=sys.stderr, flush=True)
        crashed = any(not isinstance(err, UserError) for _, err in _sweep.failed)
        sys.exit(EXIT_CRASH if crashed else EXIT_USER_ERROR)
