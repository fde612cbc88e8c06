"""Sources, the token-id cache, the windows the model trains and evaluates on, and bad data files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lmtrain.data.corpus import prepare_corpus, split_text
from lmtrain.data.windows import DeviceTokens, RandomWindows, full_pass_starts, slice_windows
from lmtrain.errors import UserError
from lmtrain.sources import TINYSHAKESPEARE, fetch
from lmtrain.tokenizer import char, gpt2

from .conftest import MIRROR, SHAKESPEARE


def corpus(tmp_path: Path, make_tokenizer=char.build, path=None, block_size=64):
    return prepare_corpus(
        name="shakespeare",
        path=path,
        cache_dir=tmp_path,
        mirror=MIRROR,
        val_fraction=0.1,
        block_size=block_size,
        make_tokenizer=make_tokenizer,
    )


def test_fetch_copies_from_the_mirror_and_checks_sha256(tmp_path):
    local = fetch(TINYSHAKESPEARE, tmp_path, MIRROR)
    assert local.read_bytes() == SHAKESPEARE.read_bytes()
    bad_mirror = tmp_path / "bad"
    bad_mirror.mkdir()
    (bad_mirror / TINYSHAKESPEARE.name).write_text("not shakespeare")
    with pytest.raises(UserError, match="sha256"):
        fetch(TINYSHAKESPEARE, tmp_path / "other-cache", bad_mirror)


def test_gpt2_ids_match_the_reference_count(tmp_path):
    c = corpus(tmp_path, gpt2.build)
    assert len(c.train_ids) + len(c.val_ids) == pytest.approx(338025, abs=5)  # split by characters
    assert (
        c.tokenizer.decode(c.val_ids[:50].tolist())
        == split_text(SHAKESPEARE.read_text(), 0.1)[1][: len(c.tokenizer.decode(c.val_ids[:50].tolist()))]
    )
    assert 3.0 < c.chars_per_token("val") < 3.5


def test_ids_are_cached_and_reused(tmp_path, monkeypatch):
    first = corpus(tmp_path)
    calls = []
    monkeypatch.setattr(char.CharTokenizer, "encode", lambda self, text: calls.append(1) or [])
    second = corpus(tmp_path)
    assert calls == [] and np.array_equal(first.train_ids, second.train_ids)


def test_a_corrupted_cache_is_a_clear_error(tmp_path):
    corpus(tmp_path)
    cached = next((tmp_path / "ids").glob("*-train.npy"))
    data = bytearray(cached.read_bytes())
    data[-1] ^= 0xFF
    cached.write_bytes(bytes(data))
    with pytest.raises(UserError, match="checksum"):
        corpus(tmp_path)


@pytest.mark.parametrize(
    "content,words",
    [(None, "does not exist"), (b"", "empty"), (b"\xff\xfe\x00bad\xc3", "not UTF-8"), (b"ab", "block_size")],
)
def test_bad_data_files(tmp_path, content, words):
    path = tmp_path / "data.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UserError, match=words):
        corpus(tmp_path, path=str(path))


def test_a_folder_of_txt_files_is_one_corpus(tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text("first file " * 100)
    (folder / "b.txt").write_text("second file " * 100)
    c = corpus(tmp_path, path=str(folder), block_size=16)
    text = c.tokenizer.decode(np.concatenate([c.train_ids, c.val_ids]).tolist())
    assert text.startswith("first file") and text.endswith("second file ")


def test_windows_are_shifted_by_one():
    ids = torch.arange(100)
    x, y = slice_windows(ids, torch.tensor([0, 10, 90]), 8)
    assert x.shape == (3, 8) and torch.equal(y, x + 1) and x[2, -1] == 97


def test_random_windows_depend_only_on_seed_rank_and_index():
    ids = torch.arange(1000, dtype=torch.int32)

    def make(first, rank=0, world=1, batch=4):
        return RandomWindows(
            DeviceTokens(ids), 16, batch, seed=7, num_batches=10, first_batch=lambda: first, rank=rank, world_size=world
        )

    full = list(make(0))
    resumed = list(make(6))
    assert len(full) == 10 and len(resumed) == 4
    assert all(torch.equal(a[0], b[0]) for a, b in zip(full[6:], resumed))
    # two ranks of 2 see the two halves of what one process of 4 sees
    one = list(make(0, batch=4, world=1))
    halves = [list(make(0, rank=r, world=2, batch=2)) for r in (0, 1)]
    for step in range(10):
        assert torch.equal(torch.cat([halves[0][step][0], halves[1][step][0]]), one[step][0])
    assert not torch.equal(halves[0][0][0], halves[1][0][0])


def test_full_pass_covers_the_split_once():
    starts = torch.cat(full_pass_starts(1000, 16, 8))
    assert torch.equal(starts, torch.arange(0, 984, 16))


def test_only_regular_files_are_read_links_fifos_and_devices_are_named(tmp_path):
    import os

    from lmtrain.sources import read_text

    (tmp_path / "folder.txt").mkdir()  # a folder whose name ends in .txt
    (tmp_path / "loop.txt").symlink_to(tmp_path / "loop.txt")
    (tmp_path / "dangling.txt").symlink_to(tmp_path / "nowhere")
    (tmp_path / "zero.txt").symlink_to("/dev/zero")  # read whole, it would never end
    os.mkfifo(tmp_path / "fifo.txt")  # read, it would block
    with pytest.raises(UserError, match="holds no readable .txt files"):
        read_text(tmp_path)
    for name in ("loop.txt", "dangling.txt", "zero.txt", "fifo.txt"):
        with pytest.raises(UserError, match=f"{name} is not a regular file"):
            read_text(tmp_path / name)
    (tmp_path / "real.txt").write_text("some text")
    assert read_text(tmp_path) == "some text"
