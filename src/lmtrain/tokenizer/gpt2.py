"""GPT-2's byte-level BPE through tiktoken, its files fetched (or copied from a mirror) into tiktoken's cache."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from ..fileio import atomic_write_bytes, sha256_file
from ..sources import GPT2_ENCODER_JSON, GPT2_VOCAB_BPE, fetch


class GPT2Tokenizer:
    kind = "gpt2"

    def __init__(self, encoding):
        self.encoding = encoding
        self.vocab_size = encoding.n_vocab  # 50257

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def decode(self, ids) -> str:
        return self.encoding.decode(list(ids))

    def state(self) -> dict:
        return {"kind": self.kind}


def load_gpt2(cache_dir: Path, mirror: Path | None) -> GPT2Tokenizer:
    """tiktoken's `gpt2`, its two files placed where tiktoken looks (named by the sha1 of their URL)."""
    import tiktoken

    tiktoken_dir = Path(os.environ.get("TIKTOKEN_CACHE_DIR") or Path(cache_dir).expanduser() / "tiktoken")
    for remote in (GPT2_VOCAB_BPE, GPT2_ENCODER_JSON):
        target = tiktoken_dir / hashlib.sha1(remote.url.encode()).hexdigest()
        if not (target.is_file() and sha256_file(target) == remote.sha256):
            atomic_write_bytes(target, fetch(remote, cache_dir, mirror).read_bytes())
    os.environ["TIKTOKEN_CACHE_DIR"] = str(tiktoken_dir)
    return GPT2Tokenizer(tiktoken.get_encoding("gpt2"))


def build(*, text: str, train_text: str, cache_dir, mirror) -> GPT2Tokenizer:
    return load_gpt2(Path(cache_dir).expanduser(), Path(mirror).expanduser() if mirror else None)
