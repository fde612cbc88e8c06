"""Bad input to sample, schedule, report, tokenizer and check (train's is in test_reliability.py): random
overrides and arguments, damaged, empty and missing files. Each command exits 0, or 2 with one `error: ...`
line, never with a traceback, and soon. The commands run inside this process: a subprocess costs ~10 s of imports."""

from __future__ import annotations

import importlib
import io
import json
import os
import re
import shutil
import sys
import time
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from lmtrain.tokenizer.bpe import BPETokenizer

from .conftest import MIRROR, REPO, compose, process_state_kept, smoke_here

SECONDS = 60  # the most one example may take
RUN_ARGS = ("trainer.max_steps=20",)
TEXT = "the cat sat on the mat. the cat ate the rat.\n" * 20
ARGPARSE_ERROR = r"python -m lmtrain\.[a-z]+( [a-z]+)?: error: "  # argparse's own last line, after its usage
DAMAGES = ("keep", "truncate", "flip", "empty", "folder", "missing")
REFUSED = ("truncate", "empty", "folder", "missing")  # damage no reader can get past
DAMAGE = st.one_of(st.just("keep"), st.sampled_from(DAMAGES[1:]))  # half the files intact: the commands get further


def cases(n: int) -> settings:
    return settings(max_examples=n, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def either(good, bad) -> st.SearchStrategy:
    """A valid value 3 times in 4 (each a strategy, or one of a list), so that examples get to the work too."""
    good, bad = (v if isinstance(v, st.SearchStrategy) else st.sampled_from(v) for v in (good, bad))
    return st.integers(0, 3).flatmap(lambda draw: bad if draw == 0 else good)


def some_of(options: dict[str, st.SearchStrategy]) -> st.SearchStrategy:
    """Up to three of the options, each with a value of its strategy."""
    keys = st.lists(st.sampled_from(sorted(options)), max_size=3, unique=True)
    return keys.flatmap(lambda chosen: st.fixed_dictionaries({key: options[key] for key in chosen}))


@dataclass
class Outcome:
    code: int
    stdout: str
    stderr: str


def run_main(module: str, *args: str, cwd: Path) -> Outcome:
    """`python -m <module> <args>` run from `cwd` inside this process: an exception escaping main() is the
    traceback a user would see, and fails the test with it."""
    main = importlib.import_module(module).main
    stdout = io.TextIOWrapper(io.BytesIO(), encoding="utf-8", write_through=True)  # decode writes to .buffer
    stderr = io.StringIO()
    code = 0
    start = time.perf_counter()
    with process_state_kept(), mock.patch.object(sys, "argv", [module, *args]):
        with redirect_stdout(stdout), redirect_stderr(stderr):
            os.chdir(cwd)
            try:
                main()
            except SystemExit as exit_:
                code = exit_.code or 0
    seconds = time.perf_counter() - start
    assert seconds < SECONDS, f"{module} {args} took {seconds:.0f} s"
    return Outcome(code, stdout.buffer.getvalue().decode("utf-8", errors="replace"), stderr.getvalue())


def assert_clean(outcome: Outcome) -> None:
    """Exit 0, or exit 2 with its one error line last on stderr; never a traceback."""
    assert "Traceback" not in outcome.stderr, outcome.stderr
    assert outcome.code in (0, 2), f"exit {outcome.code}: {outcome.stderr[-3000:]}"
    if outcome.code == 2:
        lines = outcome.stderr.splitlines()
        usage = bool(lines) and lines[0].startswith("usage: ")
        assert lines and re.match(ARGPARSE_ERROR if usage else "error: ", lines[-1]), outcome.stderr
        assert sum("error:" in line for line in lines) == 1, outcome.stderr


def damage(path: Path, how: str, data) -> None:
    """`path` cut short, with bytes flipped, emptied, replaced by a folder, or removed (`keep`: as it is)."""
    raw = path.read_bytes()
    if how == "truncate":
        path.write_bytes(raw[: data.draw(st.integers(0, len(raw) - 1), label="cut at")])
    elif how == "flip":
        flipped = bytearray(raw)
        for i in data.draw(st.lists(st.integers(0, len(raw) - 1), min_size=1, max_size=4), label="flip at"):
            flipped[i] ^= data.draw(st.integers(1, 255), label="xor")
        path.write_bytes(bytes(flipped))
    elif how == "empty":
        path.write_bytes(b"")
    elif how in ("folder", "missing"):
        path.unlink()
        if how == "folder":
            path.mkdir()


LEFT_ASIDE = {".git", ".venv", ".gpu", ".hypothesis", ".pytest_cache", "__pycache__", ".ruff_cache"}


def untracked() -> set[str]:
    """Every file in the repository's folder (a git checkout or a copy of one), caches and sources left aside."""
    found = set()
    for root, folders, files in os.walk(REPO):
        folders[:] = [f for f in folders if f not in LEFT_ASIDE]
        found |= {os.path.relpath(os.path.join(root, f), REPO) for f in files if not f.endswith(".py")}
    return found


@pytest.fixture(scope="module", autouse=True)
def repository_untouched():
    """No command writes into the repository: every one runs from a temporary folder."""
    before = untracked()
    yield
    assert untracked() <= before


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A finished tiny run, with the .hydra files the command line's run writes beside its own."""
    run = tmp_path_factory.mktemp("bad-input") / "run"
    smoke_here(run, *RUN_ARGS)
    (run / ".hydra").mkdir(exist_ok=True)
    (run / ".hydra" / "overrides.yaml").write_text(OmegaConf.to_yaml(["experiment=smoke", *RUN_ARGS]))
    (run / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(compose("experiment=smoke", *RUN_ARGS)))
    return run


def write_tokenizer_files(folder: Path) -> None:
    """tok.json, a text to encode, ids to decode (as text and as .npy), GPT-2's files to convert."""
    BPETokenizer([(104, 101), (116, 104)], "gpt2", {"<|endoftext|>": 258}).save(folder / "tok.json")
    (folder / "in.txt").write_text(TEXT)
    (folder / "ids.txt").write_text("116 258 104 10\n")
    np.save(folder / "ids.npy", np.array([116, 258, 104, 10], dtype=np.uint16))
    shutil.copytree(MIRROR / "gpt2", folder / "gpt2")


# --- sample --------------------------------------------------------------------------------------
def as_list(values: list[str]) -> str:
    return "[" + ",".join(values) + "]"


SAMPLE_OPTIONS = {
    "temperatures": st.lists(either(["0", "0.8", "1e-30", "1e30"], ["-1", "nan", "inf", "abc"]), max_size=2),
    "top_k": either(st.integers(1, 100), [0, -2, "abc", "1e40", "2.5"]),
    "top_p": either(st.floats(0.01, 1.0), [0, 1.5, "nan", "inf", "abc"]),
    "seed": either(st.integers(0, 2**32 - 1), [-1, 2**70, "abc"]),
    "num_samples": either([1, 2], [0, -1]),
    "use_cache": either(["true", "false"], ["maybe"]),
    "device": either(["auto", "cpu", "cpu:3"], ["cuda", "cuda:0", "meta", "", "xyz:1"]),
    "+bogus": st.just(1),
    "+max_new_token": st.just(5),
}
PROMPT = either(st.text(alphabet="ROMEO:\n abc!'", min_size=1, max_size=8), st.text(alphabet='"\\Ω$ ', max_size=3))


@cases(20)
@given(
    either(["best.ckpt", "last.ckpt"], ["the run folder", "samples.txt"]),
    DAMAGE,
    either(st.integers(0, 30), [-3, "abc", "1.5", "null"]),
    st.lists(PROMPT, max_size=2),
    some_of(SAMPLE_OPTIONS),
    st.data(),
)
def test_sample_exits_0_or_2(run_dir, tmp_path_factory, source, how, max_new_tokens, prompts, options, data):
    folder = tmp_path_factory.mktemp("sample")
    if source == "the run folder":
        ckpt, how = run_dir, "keep"
    else:
        ckpt = folder / source
        ckpt.write_bytes((run_dir / ("checkpoints/" if source.endswith("ckpt") else "") / source).read_bytes())
        damage(ckpt, how, data)
    args = [
        f"ckpt_path={ckpt}",
        f"max_new_tokens={max_new_tokens}",
        f"prompts={json.dumps(prompts, ensure_ascii=False)}",
    ]
    args += [f"{key}={as_list(v) if isinstance(v, list) else v}" for key, v in options.items()]
    outcome = run_main("lmtrain.sample", *args, cwd=folder)
    assert_clean(outcome)
    if how in REFUSED or not source.endswith("ckpt"):
        assert outcome.code == 2
    if outcome.code == 0:  # a header per prompt, temperature and sample
        draws = len(prompts) * len(options.get("temperatures", [0.5, 0.8, 1.2])) * options.get("num_samples", 1)
        assert outcome.stdout.count("[temp=") == draws, outcome.stdout


# --- schedule ------------------------------------------------------------------------------------
SCHEDULE_OPTIONS = {
    "optim": either(["adamw", "muon"], ["sgd"]),
    "optim.name": either(["adamw", "muon"], ["sgd", "null"]),
    "optim.warmup_steps": either(st.integers(0, 3000), [-5, "abc", "1.5", "null"]),
    "trainer.max_steps": either(st.integers(1, 20000), [0, -2, "abc", "1e3", "null"]),
    "optim.max_lr": either(["3e-4", "1", "1e300"], ["0", "-1e-3", "nan", "inf", "-inf", "abc", "null"]),
    "optim.min_lr": either(["0", "3e-5", "-0.0"], ["1", "nan", "inf", "abc"]),
    "trainer": either(["cpu", "gpu"], ["nope"]),
    "+optim.warmup_step": st.just(5),
}


@cases(15)
@given(
    either(["lr.png", "sub/dir/lr.png", "lr"], ["", ".", "/proc/none/lr.png"]),
    some_of(SCHEDULE_OPTIONS),
)
def test_schedule_exits_0_or_2(tmp_path_factory, out, options):
    folder = tmp_path_factory.mktemp("schedule")
    args = [f"{key}={value}" for key, value in options.items()]
    outcome = run_main("lmtrain.schedule", *args, f"out={out}", cwd=folder)
    assert_clean(outcome)
    if outcome.code == 0:
        assert (folder / out).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert "key points all match" in outcome.stdout


# --- report --------------------------------------------------------------------------------------
@cases(15)
@given(
    st.sampled_from(["run", "its parent", "missing", "a file", ""]),
    st.sampled_from([[], [], ["--bogus"], ["second"], ["-h"]]),
    st.data(),
)
def test_report_exits_0_or_2(run_dir, tmp_path_factory, which, extra, data):
    folder = tmp_path_factory.mktemp("report")
    run = folder / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("*.ckpt"), symlinks=True)
    events = sorted(run.glob("tb/*/events.out.tfevents.*"))
    damaged = {}
    for path in [*events, run / ".hydra/overrides.yaml", run / ".hydra/config.yaml", run / "samples.txt"]:
        damaged[path] = data.draw(DAMAGE, label=str(path.relative_to(run)))
        damage(path, damaged[path], data)
    paths = {"run": run, "its parent": folder, "missing": folder / "none", "a file": run / "summary.json"}
    outcome = run_main("lmtrain.report", str(paths.get(which, which)), *extra, cwd=folder)
    assert_clean(outcome)
    if which in ("run", "its parent", "") and not extra and all(damaged[path] == "keep" for path in events):
        assert outcome.code == 0, outcome.stderr  # a damaged file beside intact logs is a warning
        assert (run if which == "run" else folder).joinpath("report.md").is_file()


# --- tokenizer -----------------------------------------------------------------------------------
OUT = st.sampled_from(["new.json", "sub/new.json", "", ".", "/proc/none/t.json", "tok.json"])
COUNT = st.one_of(st.integers(-3, 30), st.just("x"))


def tokenizer_args(command: str, data) -> list[str]:
    """A command line for `command`, over the files of write_tokenizer_files, with random options."""
    tokenizer = ["--tokenizer", "tok.json"]
    if command == "train":
        vocab = data.draw(st.one_of(st.integers(-10, 400), st.sampled_from(["abc", str(2**70), "1e3"])))
        args = ["in.txt", "--vocab-size", str(vocab), "--out", data.draw(OUT)]
        for special in data.draw(st.lists(st.sampled_from(["<|endoftext|>", "", "a"]), max_size=2)):
            args += ["--special", special]
        return args + ["--pattern", data.draw(st.sampled_from(["gpt2", "gpt4", "none", "bogus"]))]
    if command == "encode":
        return [*tokenizer, "in.txt", *data.draw(st.sampled_from([[], ["--out", "out.npy"], ["--out", "."]]))]
    if command == "decode":
        return [*tokenizer, data.draw(st.sampled_from(["ids.txt", "ids.npy"]))]
    if command == "stats":
        return [*tokenizer, "in.txt", "--top", str(data.draw(COUNT))]
    if command == "merges":
        return [*tokenizer, "--first", str(data.draw(COUNT))]
    return ["--gpt2", "gpt2", "--out", data.draw(OUT)] if command == "convert" else []


@cases(30)
@given(st.sampled_from(["train", "encode", "decode", "stats", "merges", "convert", "bogus"]), st.data())
def test_tokenizer_exits_0_or_2(tmp_path_factory, command, data):
    folder = tmp_path_factory.mktemp("tokenizer")
    write_tokenizer_files(folder)
    files = ["tok.json", "in.txt", "ids.txt", "ids.npy", "gpt2/encoder.json", "gpt2/vocab.bpe"]
    damaged = {name: data.draw(DAMAGE, label=name) for name in files}
    for name, how in damaged.items():
        damage(folder / name, how, data)
    args = [command, *tokenizer_args(command, data), *data.draw(st.sampled_from([[], [], ["--bogus"]]))]
    outcome = run_main(TOK, *args, cwd=folder)
    assert_clean(outcome)
    if command in ("encode", "decode", "stats", "merges") and damaged["tok.json"] in REFUSED:
        assert outcome.code == 2


# --- check ---------------------------------------------------------------------------------------
@cases(6)
@given(st.lists(st.sampled_from(["accumulation", "precision", "-h", "--bogus", "", "Accumulation"]), max_size=3))
@example(["accumulation"])
@example(["precision"])
def test_check_exits_0_or_2(tmp_path_factory, args):
    outcome = run_main("lmtrain.check", *args, cwd=tmp_path_factory.mktemp("check"))
    assert_clean(outcome)
    if args == ["precision"]:
        assert outcome.code == 0 and "keeps the gradients" in outcome.stdout
    if args == ["accumulation"]:
        assert outcome.code == 0 and "match" in outcome.stdout and "MISMATCH" not in outcome.stdout


# --- the bugs these tests found, each kept ------------------------------------------------------
@pytest.fixture(scope="module")
def bad_files(run_dir, tmp_path_factory) -> Path:
    """Files each damaged in one way that once ended in a traceback (or exit 1, or a wrong hint)."""
    folder = tmp_path_factory.mktemp("found")
    write_tokenizer_files(folder)
    checkpoint = torch.load(run_dir / "checkpoints/best.ckpt", weights_only=True)
    checkpoint["hyper_parameters"]["model"]["n_head"] = 3  # 64 wide: not divisible
    torch.save(checkpoint, folder / "heads.ckpt")
    for name, text in (("bad-yaml", "data: [\n"), ("a-list", "- 1\n")):
        shutil.copytree(run_dir, folder / name, ignore=shutil.ignore_patterns("*.ckpt"), symlinks=True)
        (folder / name / ".hydra/config.yaml").write_text(text)
    np.save(folder / "grid.npy", np.zeros((2, 2), dtype=np.int64))
    np.save(folder / "floats.npy", np.array([1.5]))
    (folder / "garbage.npy").write_bytes(b"\x93NUMPY\x20garbage")
    (folder / "empty.npy").write_bytes(b"")
    (folder / "folder.npy").mkdir()
    tokenizer = json.loads((folder / "tok.json").read_text())
    (folder / "specials-list.json").write_text(json.dumps({**tokenizer, "special_tokens": ["<|endoftext|>"]}))
    (folder / "special-id-huge.json").write_text(json.dumps({**tokenizer, "special_tokens": {"<|x|>": 10**30}}))
    (folder / "nested.json").write_text("[" * 100_000)
    (folder / "not-gpt2").mkdir()
    (folder / "not-gpt2/encoder.json").write_text("[]")
    (folder / "not-gpt2/vocab.bpe").write_text("#version\n")
    return folder


BEST = "ckpt_path={run}/checkpoints/best.ckpt"
TOK = "lmtrain.tokenizer.__main__"
FOUND = [  # module, arguments ({run}: the run, {tmp}: bad_files), exit code, words on stderr (exit 0: stdout)
    ("lmtrain.sample", [], 2, "error: ckpt_path is missing; give the checkpoint to sample"),
    ("lmtrain.sample", [BEST, f"seed={2**70}"], 2, f"seed={2**70} must be in [0, 2^32)"),
    ("lmtrain.sample", ["ckpt_path={run}"], 2, "is a folder; give a checkpoint file, e.g. " + BEST),
    ("lmtrain.sample", [BEST, "+max_new_token=5"], 2, "max_new_token is not a setting of lmtrain; did you mean"),
    ("lmtrain.sample", [BEST, "cache_dir=${{nope}}"], 2, "Interpolation key 'nope' not found"),
    ("lmtrain.sample", ["ckpt_path={tmp}/heads.ckpt"], 2, "weights do not fit together (AssertionError)"),
    ("lmtrain.sample", [BEST, "prompts=[ROMEO]", "temperatures=[0]", "max_new_tokens=3"], 0, "[temp=0.0]:\nROMEO"),
    ("lmtrain.schedule", ["optim.max_lr=inf", "out=lr.png"], 2, "optim.max_lr=inf must be a finite number"),
    ("lmtrain.schedule", ["trainer.max_steps=0", "optim.warmup_steps=0"], 2, "trainer.max_steps=0 must be at least 1"),
    ("lmtrain.schedule", ["trainer.max_steps=3", "optim.warmup_steps=3", "out=lr.png"], 0, "key points all match"),
    ("lmtrain.schedule", ["out="], 2, "out= is a folder; give the image file to write, e.g. out=lr.png"),
    ("lmtrain.schedule", ["out={tmp}"], 2, "is a folder; give the image file to write"),
    ("lmtrain.schedule", ["+optim.warmup_step=5"], 2, "did you mean optim.warmup_steps?"),
    ("lmtrain.schedule", ["optim.max_lr=${{nope}}", "out=lr.png"], 2, "Interpolation key 'nope' not found"),
    ("lmtrain.report", ["{tmp}/bad-yaml"], 0, "## The lesson's checklist"),
    ("lmtrain.report", ["{tmp}/a-list"], 0, "## The lesson's checklist"),
    *(
        (TOK, ["decode", "--tokenizer", "{tmp}/tok.json", f"{{tmp}}/{name}"], 2, words)
        for name, words in [
            ("grid.npy", "(an array of int64 with shape (2, 2), not a row of integers)"),
            ("floats.npy", "(an array of float64 with shape (1,), not a row of integers)"),
            ("garbage.npy", "could not read ids from"),
            ("empty.npy", "(No data left in file)"),
            ("folder.npy", "Is a directory"),
            ("none.npy", "No such file or directory"),
        ]
    ),
    (
        TOK,
        ["train", "{tmp}/in.txt", "--vocab-size", str(2**70), "--out", "t.json"],
        2,
        "above 2^32",
    ),
    (
        TOK,
        ["train", "{tmp}/in.txt", "--out", "t.json", "--special", ""],
        2,
        "special token is empty",
    ),
    (TOK, ["train", "{tmp}/in.txt", "--out", ""], 2, "--out '' is a folder; give a file name"),
    (TOK, ["train", "{tmp}/in.txt", "--out", "{tmp}"], 2, "is a folder; give a file name"),
    (TOK, ["encode", "--tokenizer", "{tmp}/tok.json", "{tmp}/in.txt", "--out", "."], 2, "--out '.' is a folder"),
    (TOK, ["merges", "--tokenizer", "{tmp}"], 2, "is a folder; give the .json file in it"),
    (TOK, ["merges", "--tokenizer", "{tmp}/specials-list.json"], 2, "malformed field"),
    (
        TOK,
        ["encode", "--tokenizer", "{tmp}/special-id-huge.json", "{tmp}/in.txt"],
        2,
        "below 2^32",
    ),
    (TOK, ["merges", "--tokenizer", "{tmp}/nested.json"], 2, "truncated or not JSON"),
    (
        TOK,
        ["convert", "--gpt2", "{tmp}/not-gpt2", "--out", "g.json"],
        2,
        "are not GPT-2's files",
    ),
    (TOK, ["convert", "--gpt2", "{tmp}/gpt2", "--out", ""], 2, "--out '' is a folder; give a file name"),
    ("lmtrain.schedule", ["optim.warmup_steps=-1"], 2, "optim.warmup_steps=-1 must not be negative"),
    ("lmtrain.sample", [BEST, "mirror=${{oc.env:LMTRAIN_UNSET_VARIABLE}}"], 2, "could not resolve the config"),
]


@pytest.mark.parametrize("module, args, code, words", FOUND, ids=[words[:50] for *_, words in FOUND])
def test_found_bad_input_is_one_line_or_handled(run_dir, bad_files, tmp_path, module, args, code, words):
    outcome = run_main(module, *(a.format(run=run_dir, tmp=bad_files) for a in args), cwd=tmp_path)
    assert_clean(outcome)
    assert outcome.code == code
    assert words.format(run=run_dir) in (outcome.stderr if code else outcome.stdout), outcome.stderr
