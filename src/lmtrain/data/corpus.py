"""A corpus tokenized once: the text split 90/10, the tokenizer built, the ids cached as .npy files."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..fileio import atomic_write, atomic_write_bytes, sha256_bytes, sha256_file
from ..sources import REMOTES, fetch, read_text
from ..tokenizer import Tokenizer, fingerprint

TokenizerFactory = Callable[..., Tokenizer]


@dataclass
class Corpus:
    tokenizer: Tokenizer
    train_ids: np.ndarray
    val_ids: np.ndarray
    chars: dict[str, int]  # characters of each split's text, for bits per character
    bytes: dict[str, int]  # its UTF-8 bytes, for bits per byte

    def chars_per_token(self, split: str) -> float:
        return self.chars[split] / len(self.train_ids if split == "train" else self.val_ids)

    def bytes_per_token(self, split: str) -> float:
        return self.bytes[split] / len(self.train_ids if split == "train" else self.val_ids)


def load_text(name: str, path: str | None, cache_dir: Path, mirror: Path | None) -> str:
    if path:
        return read_text(Path(path))
    if name not in REMOTES:
        raise UserError(f"data.name={name!r} has no download; choose data=shakespeare or give data.path")
    return read_text(fetch(REMOTES[name], cache_dir, mirror))


def split_text(text: str, val_fraction: float) -> tuple[str, str]:
    """Split by characters (as nanoGPT's prepare scripts do): the last val_fraction is validation."""
    cut = int(len(text) * (1.0 - val_fraction))
    return text[:cut], text[cut:]


def prepare_corpus(
    *,
    name: str,
    path: str | None,
    cache_dir: Path,
    mirror: Path | None,
    val_fraction: float,
    block_size: int,
    make_tokenizer: TokenizerFactory,
) -> Corpus:
    text = load_text(name, path, cache_dir, mirror)
    train_text, val_text = split_text(text, val_fraction)
    for split, part in (("training", train_text), ("validation", val_text)):
        if len(part) <= block_size:
            raise UserError(
                f"corpus too short for block_size={block_size}: its {split} split has {len(part)} characters; "
                f"use a longer text or a smaller model.block_size"
            )
    tokenizer = make_tokenizer(text=text, train_text=train_text, cache_dir=cache_dir, mirror=mirror)
    key = f"{sha256_bytes(text.encode())[:16]}-{val_fraction:g}-{tokenizer.kind}-{fingerprint(tokenizer)}"
    ids_dir = cache_dir / "ids"
    train_ids = cached_ids(ids_dir / f"{key}-train.npy", train_text, tokenizer)
    val_ids = cached_ids(ids_dir / f"{key}-val.npy", val_text, tokenizer)
    for split, ids in (("training", train_ids), ("validation", val_ids)):
        if len(ids) < block_size + 1:
            raise UserError(
                f"corpus too short for block_size={block_size}: its {split} split has {len(ids)} tokens, "
                f"at least {block_size + 1} are needed; use a longer text or a smaller model.block_size"
            )
    return Corpus(
        tokenizer,
        train_ids,
        val_ids,
        chars={"train": len(train_text), "val": len(val_text)},
        bytes={"train": len(train_text.encode()), "val": len(val_text.encode())},
    )


def cached_ids(path: Path, text: str, tokenizer: Tokenizer) -> np.ndarray:
    """Token ids of `text`, from `path` if it was written before (checked against its checksum)."""
    meta_path = path.with_suffix(".json")
    if path.is_file() and meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if sha256_file(path) != meta.get("sha256"):
            raise UserError(f"cached token ids {path} do not match their checksum; delete the file to re-tokenize")
        return np.load(path, mmap_mode="r")
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
    ids = np.asarray(tokenizer.encode(text), dtype=dtype)
    atomic_write(path, lambda f: np.save(f, ids))
    meta = {"sha256": sha256_file(path), "tokens": len(ids), "chars": len(text), "tokenizer": tokenizer.kind}
    atomic_write_bytes(meta_path, json.dumps(meta).encode())
    return np.load(path, mmap_mode="r")
