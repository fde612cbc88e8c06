"""`python -m lmtrain.tokenizer` as a user runs it, and the BPE and SentencePiece tokenizers in training."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from lmtrain.tokenizer import from_state
from lmtrain.tokenizer.bpe import BPETokenizer

from .conftest import MIRROR, SHAKESPEARE, run_cli, scalars, smoke_here

CAT = "the cat sat on the mat. the cat ate the rat."


def tok(*args, **kwargs):
    return run_cli("lmtrain.tokenizer", *args, **kwargs)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    result = tok(
        "train",
        str(SHAKESPEARE),
        "--vocab-size",
        "600",
        "--out",
        str(folder / "tok.json"),
        "--pattern",
        "gpt4",
        "--special",
        "<|endoftext|>",
    )
    assert result.returncode == 0, result.stderr
    return folder


def test_train_writes_a_loadable_tokenizer(trained):
    tokenizer = BPETokenizer.load(trained / "tok.json")
    assert tokenizer.vocab_size == 600 and tokenizer.pattern == "gpt4"
    assert tokenizer.special_tokens == {"<|endoftext|>": 599}


def test_encode_decode_round_trip_through_files(trained, tmp_path):
    text = tmp_path / "in.txt"
    text.write_text("Grüße, ROMEO!\n\n  Wherefore art thou?<|endoftext|>😀\r\n")
    as_text = tok("encode", "--tokenizer", str(trained / "tok.json"), str(text))
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text(as_text.stdout)
    npy = tmp_path / "ids.npy"
    assert tok("encode", "--tokenizer", str(trained / "tok.json"), str(text), "--out", str(npy)).returncode == 0
    assert np.load(npy).tolist() == [int(i) for i in as_text.stdout.split()]
    for ids in (ids_file, npy):
        decoded = subprocess.run(
            [sys.executable, "-m", "lmtrain.tokenizer", "decode", "--tokenizer", str(trained / "tok.json"), str(ids)],
            capture_output=True,
            check=True,
        ).stdout
        assert decoded == text.read_bytes()


def test_stats_and_merges_are_readable(trained):
    stats = tok("stats", "--tokenizer", str(trained / "tok.json"), str(SHAKESPEARE), "--top", "5")
    assert "chars/token" in stats.stdout and len(stats.stdout.splitlines()) == 7
    merges = tok("merges", "--tokenizer", str(trained / "tok.json"), "--first", "3")
    lines = merges.stdout.splitlines()
    assert len(lines) == 3 and lines[0].startswith("merge     0: '") and "(id 256)" in lines[0]


def test_lesson_exercise_from_the_command_line(tmp_path):
    corpus = tmp_path / "cat.txt"
    corpus.write_text(CAT)
    assert (
        tok(
            "train", str(corpus), "--vocab-size", "276", "--pattern", "none", "--out", str(tmp_path / "t.json")
        ).returncode
        == 0
    )
    merges = tok("merges", "--tokenizer", str(tmp_path / "t.json"), "--first", "20").stdout.splitlines()
    assert merges and all("->" in line for line in merges)
    tokenizer = BPETokenizer.load(tmp_path / "t.json")
    # the first merge is the most frequent pair of the corpus (ties: smaller ids)
    pairs = {}
    data = CAT.encode()
    for pair in zip(data, data[1:]):
        pairs[pair] = pairs.get(pair, 0) + 1
    assert tokenizer.merges[0] == min(pairs, key=lambda p: (-pairs[p], p))
    assert tokenizer.decode(tokenizer.encode(CAT)) == CAT


def test_convert_gpt2_files(tmp_path):
    out = tmp_path / "gpt2.json"
    assert tok("convert", "--gpt2", str(MIRROR / "gpt2"), "--out", str(out)).returncode == 0
    data = json.loads(out.read_text())
    assert len(data["merges"]) == 50000 and data["byte_ids"][ord("!")] == 0


def test_the_cli_does_not_import_torch(trained, tmp_path):
    probe = (
        "import sys, runpy; sys.argv = ['x', 'merges', '--tokenizer', sys.argv[1]];"
        "\ntry: runpy.run_module('lmtrain.tokenizer', run_name='__main__')\nexcept SystemExit: pass"
        "\nassert 'torch' not in sys.modules, 'torch was imported'"
    )
    result = subprocess.run([sys.executable, "-c", probe, str(trained / "tok.json")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    "args,words",
    [
        (["merges", "--tokenizer", "/nonexistent/tok.json"], "does not exist"),
        (["train", "/nonexistent.txt", "--out", "x.json"], "does not exist"),
        (["train", str(SHAKESPEARE), "--vocab-size", "100", "--out", "x.json"], "vocab size"),
    ],
)
def test_bad_arguments_are_one_line_errors(args, words):
    result = tok(*args)
    assert result.returncode == 2 and result.stderr.startswith("error: ") and words in result.stderr
    assert "Traceback" not in result.stderr


def test_corrupt_tokenizer_file_is_one_line_error(trained, tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text((trained / "tok.json").read_text()[:100])
    result = tok("merges", "--tokenizer", str(broken))
    assert result.returncode == 2 and "truncated" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "tokenizer",
    [["tokenizer=bpe", "tokenizer.vocab_size=400"], ["tokenizer=sentencepiece", "tokenizer.vocab_size=400"]],
)
def test_smoke_training_with_our_tokenizers_and_bpc(tmp_path, tokenizer):
    run_dir = tmp_path / "run"
    smoke_here(run_dir, *tokenizer, "trainer.max_steps=20")
    series = scalars(run_dir)
    assert "val/bpc" in series
    import torch

    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["hyper_parameters"]["tokenizer_state"]
    restored = from_state(state)
    assert restored.decode(restored.encode("ROMEO:\nO, ")) == "ROMEO:\nO, "


def test_saved_tokenizer_file_is_used_for_training(trained, tmp_path):
    run_dir = tmp_path / "run"
    smoke_here(run_dir, "tokenizer=bpe", f"tokenizer.path={trained / 'tok.json'}", "trainer.max_steps=10")
    import torch

    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["hyper_parameters"]
    assert state["model"]["vocab_size"] == 600
