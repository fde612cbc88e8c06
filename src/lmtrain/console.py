"""What a training run says to the person at the terminal, kept in the run's train.log as well: its own lines
(model size, evaluations, the end, a stop, an error) beside the log records Hydra's job logging writes there;
not the live progress bar."""

from __future__ import annotations

import sys
from pathlib import Path

_log: dict[str, Path | None] = {"path": None}


def keep_in(path: Path | None) -> None:
    """From now on (None: no longer) lines said are appended to `path`."""
    _log["path"] = path


def say(text: str, err: bool = False) -> None:
    """Print `text` (to stderr with err=True) and keep it."""
    print(text, file=sys.stderr if err else sys.stdout, flush=True)
    keep(text)


def keep(text: str) -> None:
    """Append `text` to the run's log only (what Rich has shown already, say)."""
    path = _log["path"]
    if path is None:
        return
    try:
        with open(path, "a", encoding="utf-8") as log:
            log.write(text.rstrip("\n") + "\n")
    except OSError:  # a log that cannot be written costs the run nothing
        _log["path"] = None
