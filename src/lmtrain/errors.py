"""The one user-facing error type, and the command-line shells that print it as one line with exit code 2."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

EXIT_USER_ERROR = 2
_FULL_ERROR = "HYDRA_FULL_ERROR"
_USER_FULL_ERROR = "LMTRAIN_USER_HYDRA_FULL_ERROR"


class UserError(Exception):
    """A problem the user can fix: the message names the problem and the fix, on one line."""


def one_line(text: str) -> str:
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


@contextmanager
def exit_on_user_error() -> Iterator[None]:
    """Turn a UserError into `error: <message>` on stderr and exit code 2 (HYDRA_FULL_ERROR=1 re-raises)."""
    try:
        yield
    except UserError as err:
        if os.environ.get(_FULL_ERROR) == "1":
            raise
        print(f"error: {one_line(err)}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)


def _describe_hydra_error(err: BaseException) -> str:
    """Hydra's and OmegaConf's multi-line messages, folded into one line with the fix."""
    parts = [one_line(err).split(" full_key:")[0]]
    cause = err.__cause__
    if cause is not None and one_line(cause):
        parts.append(one_line(cause).split(" full_key:")[0])
    message = ": ".join(dict.fromkeys(p for p in parts if p))
    if "hydra/sweeper/optuna" in message:
        return f"{message} (the Optuna sweeper is an optional extra: pip install -e '.[optuna]')"
    return f"{message} (see the valid keys and values with `--cfg job`)"


def run_hydra_app(hydra_main: Callable[[], None]) -> None:
    """Run a @hydra.main function so that bad overrides, like bad input, print one line and exit 2.

    Hydra prints its own composition errors over several lines and exits 1; asking it to re-raise them
    (HYDRA_FULL_ERROR=1) lets us fold them into one line. `restore_full_error()` must be the first call
    inside the task function, so that errors of the task itself are reported as the user asked.
    """
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    user_value = os.environ.get(_FULL_ERROR)
    os.environ[_USER_FULL_ERROR] = user_value or ""
    os.environ[_FULL_ERROR] = "1"
    try:
        hydra_main()
    except (HydraException, OmegaConfBaseException, UserError) as err:
        if user_value == "1":
            raise
        message = one_line(err) if isinstance(err, UserError) else _describe_hydra_error(err)
        print(f"error: {message}", file=sys.stderr, flush=True)
        sys.exit(EXIT_USER_ERROR)
    finally:
        restore_full_error()


def restore_full_error() -> None:
    """Put HYDRA_FULL_ERROR back to what the user set (see run_hydra_app)."""
    if _USER_FULL_ERROR not in os.environ:
        return
    user_value = os.environ.pop(_USER_FULL_ERROR)
    if user_value:
        os.environ[_FULL_ERROR] = user_value
    else:
        os.environ.pop(_FULL_ERROR, None)
