"""A deliberately naive BPE trainer: recount every pair of every chunk occurrence before each merge.

The reference that lmtrain.tokenizer.bpe_train must equal exactly (tests), and the baseline of the
benchmark. Quadratic on purpose: it is the rule written as plainly as possible.
"""

from __future__ import annotations

import regex


def naive_merges(texts: list[str], n_merges: int, pattern_regex: str, special_tokens: list[str] = ()) -> list:
    split = regex.compile(pattern_regex)
    chunks = []
    for text in texts:
        pieces = [text]
        if special_tokens:
            specials = "(" + "|".join(regex.escape(s) for s in sorted(special_tokens, key=len, reverse=True)) + ")"
            pieces = [p for i, p in enumerate(regex.split(specials, text)) if i % 2 == 0]
        for piece in pieces:
            chunks.extend(list(chunk.encode("utf-8")) for chunk in split.findall(piece))
    merges = []
    for step in range(n_merges):
        counts = {}
        for ids in chunks:
            for pair in zip(ids, ids[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            break
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        if counts[best] < 2:
            break
        new = 256 + step
        merges.append(best)
        for c, ids in enumerate(chunks):
            out, i = [], 0
            while i < len(ids):
                if i + 1 < len(ids) and (ids[i], ids[i + 1]) == best:
                    out.append(new)
                    i += 2
                else:
                    out.append(ids[i])
                    i += 1
            chunks[c] = out
    return merges
