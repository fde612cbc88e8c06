"""The documents of a corpus to prepare: its files found, cut into pieces of about `chunk_bytes`, and read.

A piece is a byte range of a text or jsonl file, a whole .jsonl.gz file, a parquet row group or a shard of a
Hugging Face dataset. The cuts depend on the files alone (never on the worker count), so the same inputs give
the same pieces, the same shards and the same split on any machine. A text file is one document; a long one
is cut after a newline followed by a visible ASCII character, where no pre-tokenizer joins the two sides.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

TEXT_SUFFIXES = (".txt", ".md")
SUFFIXES = (*TEXT_SUFFIXES, ".jsonl", ".jsonl.gz", ".parquet")
HF_PREFIX = "hf:"


@dataclass(frozen=True)
class Piece:
    kind: str  # text | jsonl | jsonl.gz | parquet | hf
    path: str  # relative to the input (a file's name when the input is a file); the dataset name for hf
    start: int  # byte offset (text, jsonl), row group (parquet) or shard (hf)
    end: int
    split: str | None = None  # a part of a single-document corpus: its split; None: chosen per document
    ends_document: bool = True  # text: the document's last piece (the separator follows it)


@dataclass(frozen=True)
class Document:
    key: str  # what the split is drawn from: file and position, never the worker that read it
    text: str
    ends: bool  # the separator follows
    split: str | None


@dataclass(frozen=True)
class Source:
    """Where documents come from and how they are read."""

    path: str
    text_field: str = "text"
    errors: str = "strict"  # or replace: undecodable bytes become U+FFFD
    hf_name: str | None = None  # data.path=hf:NAME
    hf_config: str | None = None
    hf_split: str = "train"
    hf_data_files: str | None = None

    @property
    def root(self) -> Path:
        return Path(self.path).expanduser()


def source_files(source: Source) -> list[tuple[str, int]]:
    """(relative path, bytes) of every file to read, in name order; empty files included (they are counted)."""
    root = source.root
    if root.is_file():
        if not _suffix(root):
            raise UserError(f"data.path={source.path} is not a {'/'.join(SUFFIXES)} file; give one, or a folder")
        return [(root.name, root.stat().st_size)]
    if not root.is_dir():
        raise UserError(f"data.path={source.path} does not exist; give a text, jsonl or parquet file, or a folder")
    files = sorted(
        (p.relative_to(root).as_posix(), p.stat().st_size)
        for p in root.rglob("*")
        if p.is_file() and not p.name.startswith(".") and _suffix(p)
    )
    if not files:
        raise UserError(
            f"the folder {source.path} holds no readable files ({', '.join(SUFFIXES)}, regular files, searched "
            "recursively); set data.path to a folder or file of text"
        )
    return files


def _suffix(path: Path) -> str | None:
    name = path.name.lower()
    return next((s for s in SUFFIXES if name.endswith(s)), None)


def kind_of(relative: str) -> str:
    suffix = _suffix(Path(relative))
    return "text" if suffix in TEXT_SUFFIXES else suffix.lstrip(".")


def plan_pieces(source: Source, files: list[tuple[str, int]], chunk_bytes: int, val_fraction: float) -> list[Piece]:
    """The pieces of every non-empty file. A corpus of one text file is one document: split by characters
    (the last val_fraction is validation, as nanoGPT's prepare scripts and data=text do)."""
    if source.hf_name:
        return [Piece("hf", source.hf_name, i, i + 1) for i in range(_hf_dataset(source).num_shards)]
    files = [(rel, size) for rel, size in files if size > 0]
    if len(files) == 1 and kind_of(files[0][0]) == "text":
        rel, size = files[0]
        cut = _character_cut(_path(source, rel), 1.0 - val_fraction)
        train = _text_pieces(source, rel, 0, cut, chunk_bytes, "train")
        return [*train, *_text_pieces(source, rel, cut, size, chunk_bytes, "val")]
    pieces = []
    for rel, size in files:
        kind = kind_of(rel)
        if kind == "text":
            pieces += _text_pieces(source, rel, 0, size, chunk_bytes, None)
        elif kind == "jsonl":
            cuts = _cuts(_path(source, rel), 0, size, chunk_bytes, _line_start)
            pieces += [Piece("jsonl", rel, a, b) for a, b in zip(cuts, cuts[1:])]
        elif kind == "jsonl.gz":
            pieces.append(Piece("jsonl.gz", rel, 0, size))
        else:
            groups = _parquet(_path(source, rel), rel).metadata.num_row_groups
            pieces += [Piece("parquet", rel, g, g + 1) for g in range(groups)]
    return pieces


def _path(source: Source, rel: str) -> Path:
    root = source.root
    return root if root.is_file() else root / rel


def _text_pieces(source: Source, rel: str, start: int, end: int, chunk_bytes: int, split: str | None) -> list[Piece]:
    cuts = _cuts(_path(source, rel), start, end, chunk_bytes, _safe_text_cut)
    # a part of a single document split by characters has no separator: its ids are the whole text's
    return [Piece("text", rel, a, b, split, ends_document=b == end and split is None) for a, b in zip(cuts, cuts[1:])]


def _cuts(path: Path, start: int, end: int, chunk_bytes: int, next_cut) -> list[int]:
    """start, cuts about chunk_bytes apart where `next_cut` finds one, end."""
    cuts = [start]
    with open(path, "rb") as f:
        while cuts[-1] + chunk_bytes < end:
            cut = next_cut(f, cuts[-1] + chunk_bytes, end)
            if cut is None or cut >= end:
                break
            cuts.append(cut)
    return [*cuts, end]


def _line_start(f, position: int, end: int) -> int | None:
    """The first line start at or after `position`."""
    f.seek(position - 1)
    while f.tell() < end:
        block = f.read(1 << 16)
        if not block:
            return None
        newline = block.find(b"\n")
        if newline >= 0:
            return f.tell() - len(block) + newline + 1
    return None


_SPACE = frozenset(b" \t\n\r\x0b\x0c")


def _safe_text_cut(f, position: int, end: int) -> int | None:
    """The first offset at or after `position` that follows a newline and starts a visible ASCII character."""
    f.seek(position - 1)
    previous = f.read(1)
    while f.tell() < end:
        block = f.read(1 << 16)
        if not block:
            return None
        data = previous + block
        at = data.find(b"\n")
        while 0 <= at < len(data) - 1:
            following = data[at + 1]
            if following < 0x80 and following not in _SPACE:
                return f.tell() - len(data) + at + 1
            at = data.find(b"\n", at + 1)
        previous = data[-1:]
    return None


def _character_cut(path: Path, fraction: float) -> int:
    """The byte offset of character int(n * fraction) of a UTF-8 file of n characters (two streamed passes)."""
    import numpy as np

    def starts(block: bytes) -> np.ndarray:  # where characters start: bytes that are not 10xxxxxx
        return (np.frombuffer(block, np.uint8) & 0xC0) != 0x80

    with open(path, "rb") as f:
        total = sum(int(starts(block).sum()) for block in iter(lambda: f.read(1 << 24), b""))
        target, seen = int(total * fraction), 0
        f.seek(0)
        for block in iter(lambda: f.read(1 << 24), b""):
            where = np.flatnonzero(starts(block))
            if seen + len(where) > target:
                return f.tell() - len(block) + int(where[target - seen])
            seen += len(where)
    return f.tell()


def read_documents(source: Source, piece: Piece) -> Iterator[tuple[Document, int]]:
    """A piece's documents with the input bytes each consumed."""
    if piece.kind == "text":
        yield from _text_documents(source, piece)
    elif piece.kind in ("jsonl", "jsonl.gz"):
        yield from _jsonl_documents(source, piece)
    elif piece.kind == "parquet":
        yield from _parquet_documents(source, piece)
    else:
        yield from _hf_documents(source, piece)


def _text_documents(source: Source, piece: Piece) -> Iterator[tuple[Document, int]]:
    with open(_path(source, piece.path), "rb") as f:
        f.seek(piece.start)
        data = f.read(piece.end - piece.start)
    text = _decode(data, source, piece.path, piece.start)
    yield Document(piece.path, text, piece.ends_document, piece.split), len(data)


def _decode(data: bytes, source: Source, rel: str, offset: int) -> str:
    try:
        return data.decode("utf-8", errors=source.errors)
    except UnicodeDecodeError as err:
        raise UserError(
            f"{rel} is not UTF-8: byte 0x{data[err.start]:02x} at offset {offset + err.start}; convert the file "
            "(e.g. `iconv -f latin1 -t utf-8`), or set data.errors=replace to read such bytes as U+FFFD"
        ) from None


def _jsonl_documents(source: Source, piece: Piece) -> Iterator[tuple[Document, int]]:
    path = _path(source, piece.path)
    with gzip.open(path, "rb") if piece.kind == "jsonl.gz" else open(path, "rb") as f:
        f.seek(piece.start)
        offset = piece.start
        while piece.kind == "jsonl.gz" or offset < piece.end:
            line = f.readline()
            if not line:
                break
            if line.strip():
                text = _json_text(_decode(line, source, piece.path, offset), source, piece.path, offset)
                yield Document(f"{piece.path}:{offset}", text, True, None), len(line)
            offset += len(line)


def _json_text(line: str, source: Source, rel: str, offset: int) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise UserError(f"{rel}: the line at byte {offset} is not JSON ({err.msg}); fix or remove it") from None
    text = record.get(source.text_field) if isinstance(record, dict) else None
    if not isinstance(text, str):
        fields = ", ".join(list(record)[:5]) if isinstance(record, dict) else type(record).__name__
        raise UserError(
            f"{rel}: the line at byte {offset} has no text field {source.text_field!r} (it has: {fields}); "
            "set data.text_field to the field that holds the text"
        )
    return text


def _parquet(path: Path, rel: str):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except Exception as err:  # pyarrow's ArrowInvalid and OSError for a damaged or foreign file
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"{rel} is not a readable parquet file ({reason}); fix or remove it") from None


def _parquet_documents(source: Source, piece: Piece) -> Iterator[tuple[Document, int]]:
    parquet = _parquet(_path(source, piece.path), piece.path)
    if source.text_field not in parquet.schema_arrow.names:
        raise UserError(
            f"{piece.path} has no column {source.text_field!r} (it has: {', '.join(parquet.schema_arrow.names[:5])}); "
            "set data.text_field to the column that holds the text"
        )
    column = parquet.read_row_group(piece.start, columns=[source.text_field]).column(0).to_pylist()
    for row, text in enumerate(column):
        if text is not None:
            yield Document(f"{piece.path}:{piece.start}:{row}", text, True, None), len(text.encode("utf-8"))


def _hf_dataset(source: Source):
    try:
        import datasets
    except ImportError:
        raise UserError("data.path=hf:NAME reads through Hugging Face datasets: pip install 'lmtrain[hf]'") from None
    try:
        return datasets.load_dataset(
            source.hf_name, source.hf_config, split=source.hf_split, data_files=source.hf_data_files, streaming=True
        )
    except Exception as err:  # datasets raises many kinds: not found, offline, no such split
        raise UserError(
            f"could not open the Hugging Face dataset {source.hf_name!r} ({str(err).splitlines()[0][:160]}); check "
            "the name and the network, or give data.path a local folder of jsonl/parquet files"
        ) from None


def _hf_documents(source: Source, piece: Piece) -> Iterator[tuple[Document, int]]:
    dataset = _hf_dataset(source)
    shard = dataset.shard(num_shards=dataset.num_shards, index=piece.start)
    for row, record in enumerate(shard):
        text = record.get(source.text_field)
        if not isinstance(text, str):
            raise UserError(
                f"the dataset {source.hf_name!r} has no text field {source.text_field!r} (it has: "
                f"{', '.join(list(record)[:5])}); set data.text_field to the field that holds the text"
            )
        yield Document(f"hf:{piece.start}:{row}", text, True, None), len(text.encode("utf-8"))


def in_validation(key: str, val_fraction: float) -> bool:
    """A document's split, from its key alone: the same on every machine and for any worker count."""
    draw = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
    return draw < val_fraction * 2**64
