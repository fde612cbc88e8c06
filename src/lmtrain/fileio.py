"""Crash-safe file writes and checksums, shared by downloads, caches, tokenizers and checkpoints."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
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

    Readers see the old file or the new one, never a part. On failure (a full disk, a read-only folder) the
    temporary file is removed, the old file stays, and a UserError names the folder, the cause and the fix.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except Exception as err:  # an OSError, or a writer's own error for one (torch.save's RuntimeError)
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        reason = write_failure(err)
        if reason is None:
            raise
        kept = "the previous file is intact" if path.exists() else "nothing was written"
        raise UserError(f"could not write {path.name} in {path.parent}: {reason} ({kept})") from err
    return path


def write_failure(err: BaseException) -> str | None:
    """What went wrong writing a file, with the fix, or None for an error that is no file system's."""
    while not isinstance(err, OSError) and isinstance(err.__context__, OSError):  # torch.save's RuntimeError
        err = err.__context__
    code = getattr(err, "errno", None)
    if code == errno.ENOSPC or "write failed" in str(err) or "No space left" in str(err):
        return "the disk is full; free some space and run again"
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "the folder is not writable; fix its permissions or choose another folder"
    if isinstance(err, OSError):
        return f"{err.strerror or err}; check the folder and its free space"
    return None


@contextlib.contextmanager
def run_folder_lock(folder: Path | str) -> Iterator[None]:
    """Held while a run writes `folder`, so that a second run into it stops at once instead of mixing its files
    in. An flock: it goes with the process, so a run killed with kill -9 leaves nothing to clean up."""
    path = writable_folder(folder) / ".lock"
    with open(path, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            raise UserError(
                f"another run (pid {holder}) is writing {folder}; wait for it to end, or give this one its own "
                "folder with hydra.run.dir=<folder>"
            ) from None
        lock.truncate(0)
        lock.write(str(os.getpid()))
        lock.flush()
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def writable_folder(folder: Path | str) -> Path:
    """`folder`, made if missing, once a file could be made in it: checked before work whose result would be lost."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise UserError(f"cannot write in {folder}: {write_failure(err)}") from err
    return folder


@contextlib.contextmanager
def atomic_folder(path: Path | str) -> Iterator[Path]:
    """A folder written whole or not at all: the caller fills the temporary folder yielded, beside `path`; it is
    then renamed onto `path` (a folder there is moved aside first, and removed once the new one is in place).
    On failure the temporary folder is removed and `path` is as it was; a write that fails is a UserError."""
    path = Path(path)
    tmp, old = (path.with_name(f".{path.name}.{what}-{os.getpid()}") for what in ("tmp", "old"))
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file():
                with open(file, "rb") as f:
                    os.fsync(f.fileno())
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not path.exists():
            os.replace(old, path)
        reason = write_failure(err) if isinstance(err, OSError) else None
        if reason is None:
            raise
        raise UserError(f"could not write {path}: {reason} (nothing was written)") from err
    shutil.rmtree(old, ignore_errors=True)


def atomic_write_bytes(path: Path | str, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
