"""BPE training without recounting: each distinct chunk once, pair counts and a pair -> positions index
updated only where a merge touches, the next pair taken from a priority queue.

The rule (the tests hold a naive version of it): count adjacent pairs within pre-tokenized chunks,
overlaps included (`aaa` holds (a, a) twice), weighted by the chunk's frequency; merge the most
frequent pair, ties to the smallest (first id, then second), replacing its occurrences left to right
without overlap; stop at the vocabulary size or when no pair occurs twice.

`build` is the `tokenizer=bpe` factory: a saved tokenizer, or one trained here (cached).
"""

from __future__ import annotations

import heapq
import json
import os
import pickle
import re
from array import array
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path

from ..errors import UserError
from ..fileio import sha256_bytes
from .bpe import MAX_VOCAB, BPETokenizer, split_specials, splitter


def count_chunks(texts: Iterable[str], pattern: str, special_tokens: Iterable[str] = (), processes: int = 1) -> Counter:
    """How often each pre-tokenized chunk occurs; special tokens are cut out and never counted.

    With processes > 1 the text is cut where no chunk can span the cut (before a space that follows and
    precedes non-space: in both patterns a chunk ends there and the next begins with that space), and the
    parts are counted in forked processes.
    """
    specials = dict.fromkeys(special_tokens, 0)
    pieces = [piece for text in texts for piece, special in split_specials(text, specials) if not special]
    if processes > 1 and pattern != "none" and hasattr(os, "fork"):
        pieces = _cut(pieces, processes)
        shares = [pieces[k::processes] for k in range(processes)]
        return _count_forked(shares, pattern)
    return _count(pieces, pattern)


def _count(pieces: list[str], pattern: str) -> Counter:
    counts: Counter = Counter()
    for piece in pieces:
        counts.update(splitter(pattern, piece.isascii()).findall(piece))
    return counts


def _cut(pieces: list[str], parts: int) -> list[str]:
    boundary = re.compile(r"(?<=\S)(?= \S)")
    size = sum(map(len, pieces)) // parts + 1
    out = []
    for piece in pieces:
        start = 0
        while len(piece) - start > size and (m := boundary.search(piece, start + size)):
            out.append(piece[start : m.start()])
            start = m.start()
        out.append(piece[start:])
    return out


def _count_forked(shares: list[list[str]], pattern: str) -> Counter:
    children = []
    for share in shares[1:]:
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: count its share, send it back, exit without running the parent's cleanup
            try:
                with os.fdopen(write, "wb") as out:
                    pickle.dump(dict(_count(share, pattern)), out, protocol=pickle.HIGHEST_PROTOCOL)
            finally:
                os._exit(0)
        os.close(write)
        children.append((pid, read, share))
    counts = _count(shares[0], pattern)
    for pid, read, share in children:
        with os.fdopen(read, "rb") as incoming:
            data = incoming.read()
        os.waitpid(pid, 0)
        counts.update(pickle.loads(data) if data else _count(share, pattern))
    return counts


PAIR_BITS = 24  # a pair (a, b) is the int a << 24 | b: cheaper to hash than a tuple, and ordered the same way
LOW = (1 << PAIR_BITS) - 1


def learn_merges(
    chunk_counts: dict[str, int], n_merges: int, progress: Callable[[int], None] | None = None
) -> list[tuple[int, int]]:
    """The merges, by the C++ loop where it was built at install (the same steps), else in Python."""
    try:
        from ._bpe_native import learn_merges as native
    except ImportError:
        return learn_merges_python(chunk_counts, n_merges, progress)
    encoded = [chunk.encode("utf-8") for chunk in chunk_counts]
    merges = native(b"".join(encoded), array("q", map(len, encoded)), array("q", chunk_counts.values()), n_merges)
    if progress is not None:
        progress(len(merges))
    return merges


def learn_merges_python(
    chunk_counts: dict[str, int], n_merges: int, progress: Callable[[int], None] | None = None
) -> list[tuple[int, int]]:
    if 256 + n_merges > LOW:
        raise ValueError(f"at most {LOW - 256} merges")
    # Every distinct chunk's bytes laid end to end as symbols of a doubly linked list (-1 ends a chunk).
    sym: list[int] = []
    nxt: list[int] = []
    prv: list[int] = []
    weight: list[int] = []
    for chunk, freq in chunk_counts.items():
        data = chunk.encode("utf-8")
        base, n = len(sym), len(data)
        sym.extend(data)
        nxt.extend(range(base + 1, base + n + 1))
        nxt[-1] = -1
        prv.extend(range(base - 1, base + n - 1))
        prv[base] = -1
        weight.extend([freq] * n)

    counts: dict[int, int] = defaultdict(int)
    where: dict[int, list[int]] = defaultdict(list)  # pair -> positions; may hold stale ones, checked on use
    for i, j in enumerate(nxt):
        if j != -1:
            pair = sym[i] << PAIR_BITS | sym[j]
            counts[pair] += weight[i]
            where[pair].append(i)
    heap = [(-count, pair) for pair, count in counts.items() if count > 1]
    heapq.heapify(heap)
    pop, push = heapq.heappop, heapq.heappush

    # Heap entries may be stale. A count that grows is pushed at once; one that shrinks is pushed again only
    # when its old, larger entry reaches the top. So every pair seen twice or more has an entry at or above
    # its count, and a popped entry equal to its count is the most frequent pair (ties: the smallest first).
    merges: list[tuple[int, int]] = []
    while heap and len(merges) < n_merges:
        negative, pair = pop(heap)
        count = counts.get(pair, 0)
        if count != -negative:
            if count > -negative:  # an older entry of a grown count: the newer one is in the heap
                continue
            if count > 1:
                push(heap, (-count, pair))
            continue
        a, b = pair >> PAIR_BITS, pair & LOW
        new = 256 + len(merges)
        merges.append((a, b))
        grown: list[int] = []
        positions = where.pop(pair)
        if a == b:
            positions.sort()  # overlapping runs (a a a) are merged left to right
        new_high = new << PAIR_BITS
        b_high = b << PAIR_BITS
        for i in positions:
            j = nxt[i]
            if sym[i] != a or j == -1 or sym[j] != b:
                continue  # stale, or consumed by the merge just left of it
            f = weight[i]
            h = prv[i]
            if h != -1:
                high = sym[h] << PAIR_BITS
                counts[high | a] -= f
                key = high | new
                counts[key] += f
                where[key].append(h)
                grown.append(key)
            k = nxt[j]
            if k != -1:
                low = sym[k]
                counts[b_high | low] -= f
                key = new_high | low
                counts[key] += f
                where[key].append(i)
                grown.append(key)
                prv[k] = i
            sym[i] = new
            sym[j] = -1
            nxt[i] = k
        del counts[pair]
        for key in set(grown):
            if counts[key] > 1:  # a pair seen once cannot be merged, until it grows and is pushed then
                push(heap, (-counts[key], key))
        if progress is not None:
            progress(len(merges))
    return merges


def train_bpe(
    texts: Iterable[str],
    vocab_size: int,
    pattern: str = "gpt2",
    special_tokens: list[str] | None = None,
    progress: Callable[[int], None] | None = None,
    processes: int = 1,
) -> BPETokenizer:
    """A tokenizer of at most vocab_size ids: 256 bytes, the merges, then the special tokens."""
    specials = list(dict.fromkeys(special_tokens or []))  # a token given twice is one token
    if "" in specials:
        raise UserError("a special token is empty; give each special token at least one character")
    n_merges = vocab_size - 256 - len(specials)
    if n_merges < 0:
        raise UserError(
            f"vocab size {vocab_size} leaves no room for the 256 byte tokens and {len(specials)} "
            f"special tokens; use at least {256 + len(specials)}"
        )
    if vocab_size > MAX_VOCAB:
        raise UserError(f"vocab size {vocab_size} is above 2^32, the most ids uint32 holds; use at most {MAX_VOCAB}")
    chunk_counts = count_chunks(texts, pattern, specials, processes)
    merges = learn_merges(chunk_counts, n_merges, progress)
    special_ids = {token: 256 + len(merges) + i for i, token in enumerate(specials)}
    return BPETokenizer(merges, pattern, special_ids)


def build(
    *,
    text: str,
    train_text: str,
    cache_dir,
    mirror,
    vocab_size: int = 4096,
    pattern: str = "gpt2",
    special_tokens: list[str] | None = None,
    path: str | None = None,
) -> BPETokenizer:
    """A saved tokenizer (`path`), or one trained on the training split, cached by text hash and settings."""
    if path:
        return BPETokenizer.load(path)
    specials = list(special_tokens or [])
    key = sha256_bytes(json.dumps([sha256_bytes(train_text.encode()), vocab_size, pattern, specials]).encode())[:16]
    cached = Path(cache_dir).expanduser() / "tokenizers" / f"bpe-{key}.json"
    if cached.is_file():
        return BPETokenizer.load(cached)
    tokenizer = train_bpe([train_text], vocab_size, pattern, specials)
    tokenizer.save(cached)
    return tokenizer
