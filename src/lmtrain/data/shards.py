"""Prepared token shards: flat files of ids (nanoGPT's .bin layout), described by manifest.json.

    DIR/manifest.json         written last and atomically: a folder without it is unfinished
    DIR/train/000000.bin ...  uint16 ids where the vocabulary fits, else uint32; one file per piece and split
    DIR/val/000000.bin ...

Training maps the shards read-only (np.memmap); nothing is read whole at start-up.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..fileio import atomic_write_bytes

FORMAT = "lmtrain-prepared"
VERSION = 1
SPLITS = ("train", "val")
MANIFEST = "manifest.json"


def shard_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def shard_name(split: str, index: int) -> str:
    return f"{split}/{index:06d}.bin"


class ShardWriter:
    """Ids appended to `<name>.partial`, hashed as written; `close` renames it to `name` (nothing for no ids)."""

    def __init__(self, folder: Path, name: str, dtype: np.dtype):
        self.path = folder / name
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.dtype, self.tokens, self.digest, self.file = dtype, 0, hashlib.sha256(), None

    def write(self, ids: np.ndarray) -> None:
        if self.file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(self.partial, "wb")
        data = ids.astype(self.dtype, copy=False).tobytes()
        self.file.write(data)
        self.digest.update(data)
        self.tokens += len(ids)

    def close(self) -> dict | None:
        if self.file is None:
            return None
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.partial, self.path)
        return {
            "path": self.path.relative_to(self.path.parent.parent).as_posix(),
            "tokens": self.tokens,
            "sha256": self.digest.hexdigest(),
        }

    def discard(self) -> None:
        if self.file is not None:
            self.file.close()
        self.partial.unlink(missing_ok=True)


def write_manifest(folder: Path, manifest: dict) -> None:
    atomic_write_bytes(folder / MANIFEST, json.dumps(manifest, indent=1).encode())


def read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    if not path.is_file():
        unfinished = any(folder.glob("*/*.bin")) or (folder / ".prepare").is_dir()
        why = (
            "an unfinished preparation (run the same lmtrain.prepare command again to finish it)"
            if unfinished
            else "not a folder written by `python -m lmtrain.prepare`"
        )
        raise UserError(f"data.path={folder} has no {MANIFEST}: it is {why}")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{path} is damaged ({err}); prepare the corpus again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UserError(f"{path} is not an lmtrain.prepare manifest; give data.path a prepared folder")
    if manifest.get("version") != VERSION:
        raise UserError(
            f"{path} is format version {manifest.get('version')}; this lmtrain reads version {VERSION}: "
            "prepare the corpus again with this version"
        )
    return manifest


@dataclass
class PreparedCorpus:
    """The shards of a prepared folder, mapped; each split is their concatenation."""

    folder: Path
    manifest: dict
    shards: dict[str, list[np.memmap]]

    def tokens(self, split: str) -> int:
        return sum(len(s) for s in self.shards[split])

    def stat(self, split: str, key: str) -> int:
        return self.manifest["splits"][split][key]


def open_prepared(folder: Path | str, verify: bool = True) -> PreparedCorpus:
    """The manifest read and each shard's size checked; with `verify`, its sha256 too (once per file version:
    the result is kept beside, in .verified, keyed by size and modification time)."""
    folder = Path(folder).expanduser()
    manifest = read_manifest(folder)
    dtype = np.dtype(manifest["dtype"])
    verified = _verified(folder)
    shards: dict[str, list[np.memmap]] = {split: [] for split in SPLITS}
    for shard in manifest["shards"]:
        path = folder / shard["path"]
        if not path.is_file() or path.stat().st_size != shard["tokens"] * dtype.itemsize:
            found = f"{path.stat().st_size} bytes" if path.is_file() else "missing"
            raise UserError(
                f"shard {shard['path']} of {folder} is {found}, the manifest says "
                f"{shard['tokens'] * dtype.itemsize}: the folder was changed; prepare the corpus again"
            )
        stamp = f"{shard['path']}:{path.stat().st_size}:{path.stat().st_mtime_ns}:{shard['sha256']}"
        if verify and stamp not in verified:
            if _sha256(path) != shard["sha256"]:
                raise UserError(
                    f"shard {shard['path']} of {folder} does not match its sha256 in the manifest: the file was "
                    "changed or damaged; prepare the corpus again"
                )
            verified.add(stamp)
        shards[shard["split"]].append(np.memmap(path, dtype=dtype, mode="r"))
    if verify:
        _keep_verified(folder, verified)
    return PreparedCorpus(folder, manifest, shards)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _verified(folder: Path) -> set[str]:
    path = folder / ".verified"
    try:
        return set(path.read_text(encoding="utf-8").splitlines())
    except (OSError, UnicodeDecodeError):
        return set()


def _keep_verified(folder: Path, stamps: set[str]) -> None:
    try:
        atomic_write_bytes(folder / ".verified", "\n".join(sorted(stamps)).encode())
    except UserError:  # a read-only shared folder: verified again next time
        pass
