"""Tokenizers behind one small interface, none of which needs torch.

A tokenizer has `kind`, `vocab_size`, `encode(text) -> list[int]`, `decode(ids) -> str` and `state()`,
a JSON-able dict from which `from_state` rebuilds it: checkpoints carry it, so sampling never guesses.
Each kind has a factory `build(text=, train_text=, cache_dir=, mirror=, ...)` that the `tokenizer/` config
group instantiates: char.build, gpt2.build, bpe_train.build (loads or trains), spm.build.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Protocol

from ..errors import UserError


class Tokenizer(Protocol):
    kind: str
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids) -> str: ...

    def state(self) -> dict: ...


def encode_prompt(tokenizer: Tokenizer, prompt: str, key: str) -> list[int]:
    """A prompt's ids, or a UserError that names the setting `key` to change (not the corpus's tokenizer)."""
    try:
        ids = tokenizer.encode(prompt)
    except UserError as err:
        raise UserError(f"{key}={prompt!r} cannot be encoded: {str(err).split(';')[0]}; change {key}") from err
    if not ids:
        raise UserError(f"{key}={prompt!r} has no tokens to start from; give it at least one character")
    return ids


def fingerprint(tokenizer: Tokenizer) -> str:
    """Short hash of a tokenizer's state: keys the token-id cache."""
    blob = json.dumps(tokenizer.state(), sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def from_state(state: dict, cache_dir: Path | str = "~/.cache/lmtrain", mirror: Path | str | None = None) -> Tokenizer:
    """Rebuild the tokenizer a checkpoint was trained with."""
    kind = state.get("kind") if isinstance(state, dict) else None
    if kind == "char":
        from .char import CharTokenizer

        return CharTokenizer(state["chars"])
    if kind == "gpt2":
        from .gpt2 import load_gpt2

        return load_gpt2(Path(cache_dir).expanduser(), Path(mirror).expanduser() if mirror else None)
    if kind == "bpe":
        from .bpe import BPETokenizer

        return BPETokenizer.from_dict(state["file"])
    if kind == "sentencepiece":
        from .spm import SentencePieceTokenizer

        return SentencePieceTokenizer.from_state(state)
    raise UserError(f"unknown tokenizer kind {kind!r} in the checkpoint; was it written by lmtrain?")
