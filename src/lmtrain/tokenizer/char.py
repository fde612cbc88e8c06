"""Character-level tokenizer: one id per distinct character of the corpus, in sorted order."""

from __future__ import annotations

import numpy as np

from ..errors import UserError


class CharTokenizer:
    kind = "char"

    def __init__(self, chars: str):
        self.chars = chars
        self.vocab_size = len(chars)
        self._codepoints = np.array([ord(c) for c in chars], dtype=np.uint32)  # sorted, for searchsorted

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls("".join(sorted(set(text))))

    def encode(self, text: str) -> list[int]:
        codepoints = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        ids = np.searchsorted(self._codepoints, codepoints)
        known = ids < self.vocab_size
        known[known] = self._codepoints[ids[known]] == codepoints[known]
        if not known.all():
            unknown = chr(int(codepoints[~known][0]))
            raise UserError(
                f"character {unknown!r} is not in the char tokenizer's vocabulary (the corpus's characters); "
                "leave it out of the text, or use a byte-level tokenizer (tokenizer=bpe or gpt2) for this corpus"
            )
        return ids.tolist()

    def decode(self, ids) -> str:
        ids = list(ids)
        if any(not 0 <= i < self.vocab_size for i in ids):
            bad = next(i for i in ids if not 0 <= i < self.vocab_size)
            raise UserError(f"token id {bad} is outside the char vocabulary 0..{self.vocab_size - 1}")
        return "".join(self.chars[i] for i in ids)

    def state(self) -> dict:
        return {"kind": self.kind, "chars": self.chars}


def build(*, text: str, train_text: str, cache_dir, mirror) -> CharTokenizer:
    """The vocabulary of the whole corpus, so that no validation character is unknown (as nanoGPT does)."""
    return CharTokenizer.from_text(text)
