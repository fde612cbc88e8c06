"""SentencePiece (BPE or unigram) through the sentencepiece package, for the lesson's comparison.

Trained without normalisation or whitespace folding and with byte fallback, so any text round-trips;
newlines are a piece of their own.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

from ..errors import UserError


def _sentencepiece():
    try:
        import sentencepiece
    except ImportError as err:
        raise UserError("tokenizer=sentencepiece needs the sentencepiece package: pip install -e '.[compare]'") from err
    return sentencepiece


class SentencePieceTokenizer:
    kind = "sentencepiece"

    def __init__(self, model_proto: bytes):
        self.model_proto = model_proto
        self.processor = _sentencepiece().SentencePieceProcessor(model_proto=model_proto)
        self.vocab_size = self.processor.get_piece_size()

    def encode(self, text: str) -> list[int]:
        return self.processor.encode(text)

    def decode(self, ids) -> str:
        return self.processor.decode(list(ids))

    def state(self) -> dict:
        return {"kind": self.kind, "model": base64.b64encode(self.model_proto).decode()}

    @classmethod
    def from_state(cls, state: dict) -> SentencePieceTokenizer:
        return cls(base64.b64decode(state["model"]))


def train_sentencepiece(text: str, vocab_size: int, model_type: str) -> SentencePieceTokenizer:
    pieces = [text[i : i + 2000] for i in range(0, len(text), 2000)]  # "sentences" that keep their newlines
    model = io.BytesIO()
    _sentencepiece().SentencePieceTrainer.train(
        sentence_iterator=iter(pieces),
        model_writer=model,
        vocab_size=vocab_size,
        model_type=model_type,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        user_defined_symbols=["\n"],
        byte_fallback=True,
        character_coverage=1.0,
        allow_whitespace_only_pieces=True,
        max_sentence_length=8192,
        minloglevel=2,
    )
    return SentencePieceTokenizer(model.getvalue())


def build(*, text: str, train_text: str, cache_dir, mirror, vocab_size: int = 4096, model_type: str = "bpe"):
    """Trained on the training split once, cached by text hash and settings."""
    from ..fileio import atomic_write_bytes, sha256_bytes

    if model_type not in ("bpe", "unigram"):
        raise UserError(f"tokenizer.model_type={model_type!r} must be bpe or unigram")
    key = sha256_bytes(json.dumps([sha256_bytes(train_text.encode()), vocab_size, model_type]).encode())[:16]
    cached = Path(cache_dir).expanduser() / "tokenizers" / f"spm-{key}.model"
    if cached.is_file():
        return SentencePieceTokenizer(cached.read_bytes())
    try:
        tokenizer = train_sentencepiece(train_text, vocab_size, model_type)
    except RuntimeError as err:
        raise UserError(f"SentencePiece could not train: {err}; try a smaller tokenizer.vocab_size") from err
    atomic_write_bytes(cached, tokenizer.model_proto)
    return tokenizer
