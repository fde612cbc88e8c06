"""Crash-safe file writes and checksums, shared by downloads, caches, tokenizers and checkpoints."""

from __future__ import annotations

import errno
import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from .errors import UserError


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write(path: Path | str, write: Callable[[BinaryIO], None]) -> Path:
    """Write through a temporary file in the same folder, fsync it, then rename over `path`.

    Readers see the old file or the new one, never a part. On failure (disk full, say) the temporary
    file is removed, the old file stays, and a UserError names the path and the cause.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        hint = "free some disk space" if err.errno == errno.ENOSPC else "check the folder's permissions and space"
        kept = "the previous file is intact" if path.exists() else "nothing was written"
        raise UserError(f"could not write {path}: {err.strerror or err}; {hint} ({kept})") from err
    return path


def atomic_write_bytes(path: Path | str, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
