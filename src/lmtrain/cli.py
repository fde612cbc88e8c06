"""The one entry-point helper: the packaged configs, Hydra's main, and bad input as one line with exit code 2
(a multirun's failed jobs: lmtrain.sweeps).

    main = command(train, config_name="train")    # python -m lmtrain.train [overrides]
    cfg = compose("train", ["experiment=smoke"])  # the same config, without Hydra's main
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, ListConfig, OmegaConf

from . import config, console  # config registers the schemas the configs name
from .errors import (
    EXIT_USER_ERROR,
    FULL_ERROR,
    UserError,
    describe_hydra_error,
    exit_on_signal_stop,
    exit_on_user_error,
    one_line,
)
from .fileio import atomic_write_bytes, write_failure
from .sweeps import failed_jobs_named, job_failure_recorded


def _config_dir() -> str:
    """conf/ at the top of the repository, shipped as the package lmtrain.conf: the import system finds it in a
    wheel (site-packages/lmtrain/conf) and, through the editable install's mapping, in the repository; a source
    tree put on PYTHONPATH without an install has it two folders above this file."""
    spec = importlib.util.find_spec("lmtrain.conf")
    if spec is not None:
        return spec.submodule_search_locations[0]
    return str(Path(__file__).resolve().parents[2] / "conf")


CONFIG_DIR = _config_dir()
_USER_FULL_ERROR = "LMTRAIN_USER_HYDRA_FULL_ERROR"


def command(task: Callable[[DictConfig], Any], config_name: str) -> Callable[[], None]:
    """The `main()` of a command: Hydra composes conf/<config_name>.yaml with the command line and runs `task`.

    A bad override or a UserError prints `error: <one line>` and exits 2; HYDRA_FULL_ERROR=1 shows the traceback.
    In a multirun a failed job is recorded and the others run (lmtrain.sweeps). Training stopped by a signal
    exits 128 + its number, a multirun too. The run's .hydra/config.yaml holds the values that resolvers gave.
    `task`'s own module names the job, as if it were decorated with @hydra.main itself.
    """

    @functools.wraps(task)  # Hydra unwraps it to find the job's name and file
    def task_in_hydra(cfg: DictConfig) -> Any:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        hydra_cfg = HydraConfig.get()
        if hydra_cfg.output_subdir is not None:  # a run folder (train's): what the run says is kept in its log
            console.keep_in(Path(hydra_cfg.runtime.output_dir) / f"{hydra_cfg.job.name}.log")
        try:
            if hydra_cfg.mode == RunMode.MULTIRUN:
                with _users_full_error(), job_failure_recorded(), exit_on_signal_stop():
                    record_resolved_config(cfg)
                    return task(cfg)
            _restore_full_error()
            with exit_on_user_error(), exit_on_signal_stop():
                record_resolved_config(cfg)
                return task(cfg)
        finally:
            console.keep_in(None)

    hydra_main = hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name=config_name)(task_in_hydra)
    return functools.partial(_run_hydra_app, hydra_main)


def compose(config_name: str, overrides: Sequence[str] = ()) -> DictConfig:
    """The config `python -m lmtrain.<config_name> <overrides>` would run with, for callers without Hydra's main."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(version_base="1.3", config_dir=CONFIG_DIR):
        return hydra_compose(config_name=config_name, overrides=list(overrides))


def _run_hydra_app(hydra_main: Callable[[], None]) -> None:
    """Run a @hydra.main function so that bad overrides, like bad input, print one line and exit 2.

    Hydra prints its own composition errors over several lines and exits 1; asking it to re-raise them
    (HYDRA_FULL_ERROR=1) lets us fold them into one line; the task runs with the user's own setting again
    (`command`'s wrapper restores it first), so that errors of the task itself are reported as the user asked.
    """
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    user_value = os.environ.get(FULL_ERROR)
    os.environ[_USER_FULL_ERROR] = user_value or ""
    os.environ[FULL_ERROR] = "1"
    try:
        with failed_jobs_named(full_error=user_value == "1"):
            hydra_main()
    except (HydraException, OmegaConfBaseException, UserError) as err:
        if user_value == "1":
            raise
        message = one_line(err) if isinstance(err, UserError) else moved_key_hint(err) or describe_hydra_error(err)
        print(f"error: {message}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)
    except OSError as err:  # Hydra making the run folder or writing its config there
        if user_value == "1":
            raise
        print(f"error: could not write {err.filename or 'the run folder'}: {write_failure(err)}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    finally:
        _restore_full_error()


def moved_key_hint(err: BaseException) -> str | None:
    """The fix for an old model.* speed switch that a composition error names, or None."""
    while err is not None:
        hint = config.moved_key_hint(str(getattr(err, "full_key", "") or ""))
        if hint:
            return hint
        err = err.__cause__
    return None


def _restore_full_error() -> None:
    """Put HYDRA_FULL_ERROR back to what the user set (see _run_hydra_app)."""
    if _USER_FULL_ERROR in os.environ:
        _set_full_error(os.environ.pop(_USER_FULL_ERROR))


@contextmanager
def _users_full_error() -> Iterator[None]:
    """A multirun's job runs with the user's HYDRA_FULL_ERROR, and the sweeper after it with ours (see
    _run_hydra_app), so that what it raises for a failed job comes to `failed_jobs_named`."""
    ours = os.environ.get(FULL_ERROR)
    _set_full_error(os.environ.get(_USER_FULL_ERROR, ours))
    try:
        yield
    finally:
        _set_full_error(ours)


def _set_full_error(value: str | None) -> None:
    if value:
        os.environ[FULL_ERROR] = value
    else:
        os.environ.pop(FULL_ERROR, None)


_RESOLVER_CALL = re.compile(r"(?<!\\)\$\{\s*[A-Za-z_][\w.]*\s*:")  # `${name:...}`; a key's `${a.b}` has no colon


def record_resolved_config(cfg: DictConfig) -> None:
    """Replace each value a resolver computes (`${lmtrain.on_gpu:6,2}`, `${hydra:runtime.output_dir}`) by what it
    gave, in `cfg` and in the run's .hydra/config.yaml, which Hydra wrote before. References to other keys
    (`${output_dir}/checkpoints`) stay, so that `ckpt_path=last` still finds a run of this config in another folder.
    """
    from hydra.core.hydra_config import HydraConfig
    from omegaconf.errors import OmegaConfBaseException

    try:
        _resolve_computed_values(cfg, OmegaConf.to_container(cfg, resolve=False))
    except OmegaConfBaseException as err:  # `${oc.env:UNSET}`, say: the task's own error, on one line
        raise UserError(f"could not resolve the config: {describe_hydra_error(err)}") from err
    hydra_cfg = HydraConfig.get()
    if hydra_cfg.output_subdir is not None:
        config_file = Path(hydra_cfg.runtime.output_dir) / hydra_cfg.output_subdir / "config.yaml"
        atomic_write_bytes(config_file, OmegaConf.to_yaml(cfg).encode())


def _resolve_computed_values(node: DictConfig | ListConfig, raw: dict | list) -> None:
    for key, value in raw.items() if isinstance(raw, dict) else enumerate(raw):
        if isinstance(value, str) and _RESOLVER_CALL.search(value):
            node[key] = node[key]
        elif isinstance(value, dict | list):
            _resolve_computed_values(node[key], value)
