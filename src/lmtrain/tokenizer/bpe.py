"""Byte-level BPE: the tokenizer, its encoders and its file format.

A tokenizer is 256 byte tokens, an ordered list of merges (merge i creates id 256 + i from two
existing ids), special tokens, and a pre-tokenization pattern. Encoding follows tiktoken's rule:
within each pre-tokenized chunk, repeatedly merge the adjacent pair whose joined bytes have the
lowest id, leftmost first. tiktoken's Rust core does it when installed; `encode_chunk` is the
same rule in Python.
"""

from __future__ import annotations

import heapq
import json
import re
import sys
from functools import cached_property
from pathlib import Path

from ..errors import UserError

FORMAT, VERSION = "lmtrain-bpe", 1
MAX_VOCAB = 2**32  # ids are saved as uint32 (`lmtrain.tokenizer encode --out`, the data cache)
PATTERNS = {  # in the syntax of the `regex` package (\p{L}: any letter, \p{N}: any number)
    # GPT-2's split: contractions, letters, digits, other symbols, whitespace (trailing space kept apart)
    "gpt2": r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
    # cl100k (GPT-4): case-insensitive contractions, digits in threes, newlines kept with symbols
    "gpt4": r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
    r"""|\s*[\r\n]|\s+(?!\S)|\s+""",
    # no pre-tokenization: merges may cross spaces, as SentencePiece's BPE without whitespace splitting
    "none": r"""[\s\S]+""",
}
# The same patterns for text that is all ASCII, in the standard library's (faster) `re`: there the letters
# are [A-Za-z], the numbers [0-9] and the Unicode white space is [\t\n\v\f\r ] (\x1c-\x1f are not).
_S = r"\t\n\x0b\x0c\r "
ASCII_PATTERNS = {
    "gpt2": rf"""'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^{_S}A-Za-z0-9]+|[{_S}]+(?![^{_S}])|[{_S}]+""",
    "gpt4": rf"""'(?i:[sdmt]|ll|ve|re)|[^\r\nA-Za-z0-9]?+[A-Za-z]+|[0-9]{{1,3}}| ?[^{_S}A-Za-z0-9]++[\r\n]*"""
    rf"""|[{_S}]*[\r\n]|[{_S}]+(?![^{_S}])|[{_S}]+""",
    "none": r"""[\s\S]+""",
}


def splitter(pattern: str, ascii_text: bool):
    """The compiled pre-tokenizer of a named pattern: `re` on ASCII text (possessive quantifiers need
    Python 3.11), the `regex` package otherwise. Both split ASCII text identically (a test checks)."""
    if ascii_text and sys.version_info >= (3, 11):
        return re.compile(ASCII_PATTERNS[pattern])
    import regex

    return regex.compile(PATTERNS[pattern])


def split_specials(text: str, special_tokens: dict[str, int]) -> list[tuple[str, bool]]:
    """[(piece, is_special)] in order; special tokens are kept whole."""
    if not special_tokens:
        return [(text, False)] if text else []
    alternatives = "|".join(re.escape(s) for s in sorted(special_tokens, key=len, reverse=True))
    return [(piece, i % 2 == 1) for i, piece in enumerate(re.split(f"({alternatives})", text)) if piece]


class BPETokenizer:
    kind = "bpe"

    def __init__(
        self,
        merges: list[tuple[int, int]],
        pattern: str = "gpt2",
        special_tokens: dict[str, int] | None = None,
        byte_ids: list[int] | None = None,
        regex_str: str | None = None,
    ):
        self.merges = [tuple(m) for m in merges]
        self.pattern = pattern
        self.regex_str = regex_str or PATTERNS[pattern]
        self.special_tokens = dict(special_tokens or {})
        self.byte_ids = list(byte_ids) if byte_ids is not None else list(range(256))
        self.token_bytes = self._token_bytes()
        self.vocab_size = max([len(self.token_bytes) - 1, *self.special_tokens.values()]) + 1
        self._cache: dict[str, list[int]] = {}

    def _token_bytes(self) -> list[bytes]:
        table: list[bytes | None] = [None] * (256 + len(self.merges))
        for byte, token in enumerate(self.byte_ids):
            table[token] = bytes([byte])
        for i, (left, right) in enumerate(self.merges):
            if not (0 <= left < 256 + i and 0 <= right < 256 + i) or table[left] is None or table[right] is None:
                raise UserError(f"merge {i} ({left}, {right}) uses an id not defined before it; the file is corrupt")
            table[256 + i] = table[left] + table[right]
        return table

    @cached_property
    def ranks(self) -> dict[bytes, int]:
        """Token bytes -> id; where two merges made the same bytes, the first (lower id) wins."""
        ranks: dict[bytes, int] = {}
        for token, data in enumerate(self.token_bytes):
            ranks.setdefault(data, token)
        return ranks

    @cached_property
    def tiktoken_encoding(self):
        """tiktoken's Rust encoder over our ranks, or None where it cannot be exact (see use_tiktoken)."""
        if not self.use_tiktoken:
            return None
        try:
            import tiktoken
        except ImportError:
            return None
        return tiktoken.Encoding(
            f"lmtrain-bpe-{len(self.merges)}",
            pat_str=self.regex_str,
            mergeable_ranks=self.ranks,
            special_tokens=self.special_tokens,
        )

    @property
    def use_tiktoken(self) -> bool:
        # Duplicate token bytes leave ids tiktoken cannot map; whole-text pieces ("none") are quadratic there.
        return len(self.ranks) == len(self.token_bytes) and self.pattern != "none"

    # --- encoding ---------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        encoding = self.tiktoken_encoding
        if encoding is not None:
            if not self.special_tokens:
                return encoding.encode_ordinary(text)
            return encoding.encode(text, allowed_special="all")
        return self.encode_python(text)

    def _splitter(self, piece: str):
        if self.regex_str == PATTERNS.get(self.pattern):
            return splitter(self.pattern, piece.isascii())
        import regex

        return regex.compile(self.regex_str)

    def encode_python(self, text: str) -> list[int]:
        ids: list[int] = []
        for piece, special in split_specials(text, self.special_tokens):
            if special:
                ids.append(self.special_tokens[piece])
                continue
            for chunk in self._splitter(piece).findall(piece):
                cached = self._cache.get(chunk)
                if cached is None:
                    cached = encode_chunk(chunk.encode("utf-8"), self.ranks)
                    if len(chunk) < 64:
                        self._cache[chunk] = cached
                ids.extend(cached)
        return ids

    def decode_bytes(self, ids) -> bytes:
        specials = {v: k.encode("utf-8") for k, v in self.special_tokens.items()}
        table = self.token_bytes
        ids = list(ids)
        if any(not 0 <= i < self.vocab_size for i in ids):
            raise UserError(
                f"token id {next(i for i in ids if not 0 <= i < self.vocab_size)} is outside the "
                f"vocabulary 0..{self.vocab_size - 1}; decode ids this tokenizer made"
            )
        try:
            return b"".join(specials[i] if i in specials else table[i] for i in ids)
        except (IndexError, TypeError) as err:
            raise UserError(f"token id outside the vocabulary of {self.vocab_size}: {err}") from err

    def decode(self, ids) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    # --- files ------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "version": VERSION,
            "pattern": self.pattern,
            "regex": self.regex_str,
            "special_tokens": self.special_tokens,
            "byte_ids": self.byte_ids,
            "merges": [list(m) for m in self.merges],
        }

    def state(self) -> dict:
        return {"kind": self.kind, "file": self.to_dict()}

    def save(self, path: Path | str) -> Path:
        from ..fileio import atomic_write_bytes

        return atomic_write_bytes(Path(path), json.dumps(self.to_dict(), separators=(",", ":")).encode())

    @classmethod
    def from_dict(cls, data: dict, source: str = "the tokenizer data") -> BPETokenizer:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise UserError(f'{source} is not an lmtrain BPE tokenizer file (no "format": "{FORMAT}")')
        if data.get("version") != VERSION:
            raise UserError(
                f"{source} has format version {data.get('version')}; this lmtrain reads version "
                f"{VERSION}: retrain it or convert it with a matching lmtrain"
            )
        try:
            merges = [(int(a), int(b)) for a, b in data["merges"]]
            byte_ids = [int(i) for i in data["byte_ids"]]
            specials = {str(k): int(v) for k, v in data["special_tokens"].items()}
            pattern, regex_str = str(data["pattern"]), str(data["regex"])
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise UserError(f"{source} is missing or has a malformed field ({err}); the file is corrupt") from err
        if sorted(byte_ids) != list(range(256)):
            raise UserError(f"{source}: byte_ids must hold 256 distinct ids 0..255; the file is corrupt")
        for index, (a, b) in enumerate(merges):
            if not (0 <= a < 256 + index and 0 <= b < 256 + index):
                raise UserError(f"{source}: merge {index} ({a}, {b}) joins an id not made yet; the file is corrupt")
        first_special = 256 + len(merges)
        for token, id_ in specials.items():
            if not token or not first_special <= id_ < MAX_VOCAB or list(specials.values()).count(id_) > 1:
                raise UserError(
                    f"{source}: special token {token!r} -> {id_} must be a non-empty string with an id of its own "
                    f"from {first_special} on (after the bytes and merges) and below 2^32; the file is corrupt"
                )
        try:
            import regex

            regex.compile(regex_str)
        except regex.error as err:
            raise UserError(
                f"{source}: its pre-tokenization regex does not compile ({err}); the file is corrupt"
            ) from err
        return cls(merges, pattern, specials, byte_ids, regex_str)

    @classmethod
    def load(cls, path: Path | str) -> BPETokenizer:
        path = Path(path)
        if path.is_dir():
            raise UserError(f"tokenizer file {path} is a folder; give the .json file in it that `train --out` wrote")
        if not path.is_file():
            raise UserError(f"tokenizer file {path} does not exist; train one with `python -m lmtrain.tokenizer train`")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:  # RecursionError: [[[[...
            raise UserError(
                f"tokenizer file {path} is truncated or not JSON ({err}); retrain or re-convert it"
            ) from err
        return cls.from_dict(data, source=f"tokenizer file {path}")


def encode_chunk(data: bytes, ranks: dict[bytes, int]) -> list[int]:
    """tiktoken's rule on one chunk: merge the adjacent pair of lowest rank, leftmost first, until none."""
    whole = ranks.get(data)
    if whole is not None:
        return [whole]
    n = len(data)
    starts = list(range(n))  # symbol i covers data[starts[i]:starts[nxt[i]]]
    nxt = list(range(1, n + 1))
    prv = list(range(-1, n - 1))
    alive = [True] * n

    def end(i: int) -> int:
        return starts[nxt[i]] if nxt[i] < n else n

    heap = []
    for i in range(n - 1):
        rank = ranks.get(data[i : i + 2])
        if rank is not None:
            heap.append((rank, i, i + 2))
    heapq.heapify(heap)
    while heap:
        rank, i, stop = heapq.heappop(heap)
        j = nxt[i] if alive[i] else n
        if j >= n or end(j) != stop:  # stale: one of the two symbols changed since this entry was pushed
            continue
        alive[j] = False  # merge symbol j into symbol i
        nxt[i] = nxt[j]
        if nxt[i] < n:
            prv[nxt[i]] = i
        if nxt[i] < n:
            right = ranks.get(data[starts[i] : end(nxt[i])])
            if right is not None:
                heapq.heappush(heap, (right, i, end(nxt[i])))
        if prv[i] >= 0:
            h = prv[i]
            left = ranks.get(data[starts[h] : end(i)])
            if left is not None:
                heapq.heappush(heap, (left, h, end(i)))
    ids = []
    i = 0
    while i < n:
        ids.append(ranks[data[starts[i] : end(i)]])
        i = nxt[i]
    return ids


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-ins for bytes: printable Latin-1 bytes map to themselves, the rest to 256+."""
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def from_gpt2_files(folder: Path | str) -> BPETokenizer:
    """GPT-2's own `encoder.json` + `vocab.bpe` as our tokenizer (its byte tokens keep GPT-2's ids)."""
    folder = Path(folder)
    try:
        encoder = json.loads((folder / "encoder.json").read_text(encoding="utf-8"))
        lines = (folder / "vocab.bpe").read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise UserError(f"could not read GPT-2's encoder.json and vocab.bpe in {folder} ({err})") from err
    try:
        byte_ids = [encoder[ch] for _, ch in sorted(bytes_to_unicode().items())]
        merges = []
        for i, line in enumerate(line for line in lines[1:] if line.strip()):
            left, right = line.split()
            merges.append((encoder[left], encoder[right]))
            if encoder[left + right] != 256 + i:
                raise UserError(f"vocab.bpe merge {i} ({line}) does not create id {256 + i} in encoder.json")
        specials = {token: token_id for token, token_id in encoder.items() if token.startswith("<|")}
    except (KeyError, TypeError, ValueError) as err:
        raise UserError(
            f"GPT-2's encoder.json and vocab.bpe in {folder} are not GPT-2's files ({type(err).__name__}: {err}); "
            "copy the originals again"
        ) from err
    fields = dict(pattern="gpt2", regex=PATTERNS["gpt2"], special_tokens=specials, byte_ids=byte_ids, merges=merges)
    return BPETokenizer.from_dict({"format": FORMAT, "version": VERSION, **fields}, source=f"GPT-2's files in {folder}")
