"""`python -m lmtrain.bench prepare`: ours and nanoGPT's recipe hold the same documents' ids, the generated corpus
is the same for the same seed, and the memory measured is the whole tree's PSS (shared pages counted once)."""

from __future__ import annotations

import sys
import textwrap

import numpy as np

from lmtrain.bench_prepare import EOT, compare_tokens, measured, run_baseline, run_ours, write_corpus


def documents(ids: np.ndarray) -> list[tuple[int, ...]]:
    """The ids cut after each end-of-text (the generated text never encodes to it)."""
    ends = np.flatnonzero(ids == EOT) + 1
    assert len(ends) and ends[-1] == len(ids)
    return [tuple(d) for d in np.split(ids, ends[:-1])]


def test_ours_and_the_baseline_hold_the_same_documents(tmp_path):
    corpus = write_corpus(tmp_path / "corpus", 2_000_000, seed=1)
    ours = run_ours(tmp_path / "corpus", tmp_path / "ours", 2, tmp_path / "ours.log")
    theirs = run_baseline(tmp_path / "corpus", tmp_path / "baseline" / "train.bin", 2, tmp_path / "baseline.log")
    check = compare_tokens(ours, tmp_path / "ours", theirs, tmp_path / "baseline" / "train.bin")
    assert check["totals_match"] and check["same_id_counts"] and ours["tokens"] == theirs["tokens"]
    # each document's ids: in the baseline in file order; ours split into train and val, each in that order
    baseline = documents(np.fromfile(tmp_path / "baseline" / "train.bin", dtype=np.uint16))
    splits = {s: [documents(np.fromfile(p, np.uint16)) for p in sorted((tmp_path / "ours" / s).glob("*.bin"))]
              for s in ("train", "val")}  # fmt: skip
    train, val = ([d for shard in splits[s] for d in shard] for s in ("train", "val"))
    assert len(baseline) == corpus["documents"] == len(train) + len(val) and val
    assert sorted(train + val) == sorted(baseline)
    in_val = set(val)
    assert [d for d in baseline if d not in in_val] == train


def test_the_corpus_is_the_same_for_the_same_seed(tmp_path):
    first = write_corpus(tmp_path / "a", 300_000, seed=3)
    again = write_corpus(tmp_path / "b", 300_000, seed=3)
    other = write_corpus(tmp_path / "c", 300_000, seed=4)
    read = {name: (tmp_path / name / "part-00000.jsonl").read_bytes() for name in "abc"}
    assert first == again and read["a"] == read["b"] and read["a"] != read["c"] and other["bytes"] >= 300_000


def test_peak_memory_is_the_pss_of_the_whole_tree(tmp_path):
    """A parent's 100 MB, shared with the child it forks, counted once; the child's own 200 MB counted too."""
    code = textwrap.dedent("""
        import os, time
        shared = b"x" * (100 << 20)
        if os.fork() == 0:
            own = b"y" * (200 << 20)
            time.sleep(1.5)
            os._exit(0)
        os.wait()
    """)
    peak = measured([sys.executable, "-c", code], tmp_path / "log")["peak_pss_mb"]
    assert 300 <= peak < 380  # the sum of RSS would be over 400
