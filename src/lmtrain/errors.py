"""The one user-facing error type, and its one-line form: `error: <message>` on stderr with exit code 2.

Hydra commands get the same through `cli.command`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from .console import say

EXIT_USER_ERROR = 2
FULL_ERROR = "HYDRA_FULL_ERROR"  # =1: tracebacks instead of one-line errors


class UserError(Exception):
    """A problem the user can fix: the message names the problem and the fix, on one line."""


class StoppedBySignal(Exception):
    """Training stopped on SIGTERM or Ctrl-C after writing the checkpoint it resumes from; the command exits
    128 + the signal's number, as a shell does (130 for Ctrl-C, 143 for SIGTERM)."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


@contextmanager
def exit_on_signal_stop() -> Iterator[None]:
    try:
        yield
    except StoppedBySignal as stop:
        say(str(stop))
        sys.exit(128 + stop.signum)


def one_line(text: str) -> str:
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


@contextmanager
def exit_on_user_error() -> Iterator[None]:
    """Turn a UserError into `error: <message>` on stderr and exit code 2 (HYDRA_FULL_ERROR=1 re-raises)."""
    try:
        yield
    except UserError as err:
        if os.environ.get(FULL_ERROR) == "1":
            raise
        say(f"error: {one_line(err)}", err=True)
        sys.exit(EXIT_USER_ERROR)


def describe_hydra_error(err: BaseException) -> str:
    """Hydra's and OmegaConf's multi-line messages, folded into one line with the fix."""
    parts = [one_line(err).split(" full_key:")[0]]
    cause = err.__cause__
    if cause is not None and one_line(cause):
        parts.append(one_line(cause).split(" full_key:")[0])
    message = ": ".join(dict.fromkeys(p for p in parts if p))
    if "hydra/sweeper/optuna" in message:
        return f"{message} (the Optuna sweeper is an optional extra: pip install -e '.[optuna]')"
    return f"{message} (see the valid keys and values with `--cfg job`)"
