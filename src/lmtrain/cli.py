"""The one entry-point helper: the packaged configs, Hydra's main, and bad input as one line with exit code 2.

    main = command(train, config_name="train")    # python -m lmtrain.train [overrides]
    cfg = compose("train", ["experiment=smoke"])  # the same config, without Hydra's main
"""

from __future__ import annotations

import functools
import importlib.util
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from . import config  # registers the schemas the configs name
from .errors import (
    EXIT_USER_ERROR,
    FULL_ERROR,
    UserError,
    describe_hydra_error,
    exit_on_signal_stop,
    exit_on_user_error,
    one_line,
)
from .fileio import write_failure


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
    Training stopped by a signal exits 128 + its number.
    `task`'s own module names the job, as if it were decorated with @hydra.main itself.
    """

    @functools.wraps(task)  # Hydra unwraps it to find the job's name and file
    def task_in_hydra(cfg: DictConfig) -> Any:
        _restore_full_error()
        with exit_on_user_error(), exit_on_signal_stop():
            return task(cfg)

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
    if _USER_FULL_ERROR not in os.environ:
        return
    user_value = os.environ.pop(_USER_FULL_ERROR)
    if user_value:
        os.environ[FULL_ERROR] = user_value
    else:
        os.environ.pop(FULL_ERROR, None)
