"""The docs keep up with the code: a row in docs/options.md per schema key, a Layout line per module, and every
command written in the README, a config or a docstring runs as written."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import io
import logging
import os
import re
import shlex
import sys
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import MISSING, fields, is_dataclass
from pathlib import Path
from unittest import mock

import pytest
import torch

from lmtrain import config

from .conftest import MIRROR, SHAKESPEARE, process_state_kept

REPO = Path(__file__).resolve().parents[1]
SKIPPED = {"_target_", "_partial_"}


def schema_keys(schema, prefix: str = "") -> set[str]:
    keys = set()
    for f in fields(schema):
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        if is_dataclass(default):
            keys |= schema_keys(type(default), f"{prefix}{f.name}.")
        elif f.name not in SKIPPED:
            keys.add(prefix + f.name)
    return keys


def documented(section: str) -> set[str]:
    """The keys in the first column of the tables under the `## <section>` heading of docs/options.md."""
    text = (REPO / "docs" / "options.md").read_text(encoding="utf-8")
    body = text.split(f"## `{section}`", 1)[1].split("\n## ", 1)[0]
    cells = re.findall(r"^\| (`[^|]+`) \|", body, flags=re.MULTILINE)  # a cell may name several: `a`, `b`
    return {key for cell in cells for key in re.findall(r"`([^`]+)`", cell)}


def training_keys() -> set[str]:
    """The train schema's keys, with those of the tokenizer and data options that add their own."""
    keys = schema_keys(config.TrainConfig) - {"tokenizer"}
    for tokenizer in (config.BPETokenizerConfig, config.SentencePieceTokenizerConfig):
        keys |= schema_keys(tokenizer, "tokenizer.")
    return keys | schema_keys(config.PreparedDataConfig, "data.")


def test_every_training_key_has_a_row_in_the_options_table():
    missing = training_keys() - documented("python -m lmtrain.train")
    assert not missing, f"docs/options.md has no row for {sorted(missing)}"


def test_every_sample_and_schedule_key_has_a_row():
    assert not schema_keys(config.SampleConfig) - documented("python -m lmtrain.sample")
    schedule_only = schema_keys(config.ScheduleConfig) - schema_keys(config.TrainConfig)
    assert not schedule_only - documented("python -m lmtrain.schedule")


def test_every_prepare_key_has_a_row():
    rows = documented("python -m lmtrain.prepare")
    keys = schema_keys(config.PrepareConfig) - {"tokenizer"}
    assert not keys - rows, f"docs/options.md has no prepare row for {sorted(keys - rows)}"
    assert not rows - keys, f"docs/options.md documents prepare keys that do not exist: {sorted(rows - keys)}"


def test_every_option_row_names_a_real_key():
    stale = documented("python -m lmtrain.train") - training_keys()
    assert not stale, f"docs/options.md documents keys that do not exist: {sorted(stale)}"


def test_the_readme_layout_names_every_module():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    layout = readme.split("## Layout", 1)[1]
    package = REPO / "src" / "lmtrain"
    modules = [p.relative_to(package).as_posix() for p in package.rglob("*") if p.suffix in (".py", ".cpp")]
    modules = [m for m in modules if m not in ("__init__.py", "data/__init__.py", "tokenizer/__init__.py")]
    missing = [m for m in modules if not re.search(rf"(^|\s){re.escape(m)}\s", layout, flags=re.MULTILINE)]
    missing = [m for m in missing if not (m.endswith(".cpp") and Path(m).name in layout)]
    assert not missing, f"the README's Layout does not name {missing}"


def test_the_readme_stays_short():
    assert len((REPO / "README.md").read_text(encoding="utf-8").splitlines()) <= 150


# --- every command written in the README, a config or a docstring, run as written ---------------------------
# What a reader fills in (in this order); <run> is a run the test trains first, <sweep> the folder of the last sweep.
FILLED = {r"--gpt2 DIR\b": f"--gpt2 {MIRROR / 'gpt2'}", r"\bout=DIR\b": "out=prepared",
          r"\bdata\.path=DIR\b": "data.path=prepared", r"=INPUT\b": "=corpus/",
          r"\bINPUT\.\.\.": "data.txt", r"\bIDS_FILE\b": "ids.npy", r"\bFILE\b": "data.txt",
          r"ckpt_path=\.\.\.": "ckpt_path=<run>/checkpoints/best.ckpt", r"outputs/multirun/<date>/<time>": "<sweep>",
          r"outputs/<date>/<time>": "<run>", r"outputs/<run>": "<run>", r"\s\.\.\.$": ""}  # fmt: skip
# Appended so that each command ends in seconds: smaller and shorter, never another option.
SMALL_MODEL = ("model.n_layer=1", "model.n_head=1", "model.n_embd=4", "model.block_size=4", "trainer.batch_size=1",
               "trainer.accumulate_grad_batches=1", "trainer.tokens_per_step=null", "trainer.eval_batches=1",
               "callbacks.sample_text.max_new_tokens=4")  # fmt: skip
SHORT_RUN = ("trainer.max_steps=2", "trainer.eval_interval=2", "optim.warmup_steps=0")
SHORT_SWEEP = ("trainer.max_steps=200", "trainer.eval_interval=200")  # the longest warmup a written sweep tries
SMALLER = {"lmtrain.sample": ("max_new_tokens=4",), "lmtrain.bench tokenizer": ("--sizes", "512", "--repeats", "1"),
           "lmtrain.bench train": (*SMALL_MODEL, "--steps", "1", "--warmup", "1"),
           "lmtrain.bench prepare": ("--sizes-gb", "0.001", "--no-startup")}  # fmt: skip
GPU_ONLY = re.compile(r"\bfast=(?!none\b)|\bfast\.loss=fused\b|\btrainer=ddp\b")  # CUDA graphs, Triton, one per GPU


def written_commands() -> list[str]:
    """Each line that is a `python -m lmtrain.` command, once: in the README's code blocks, the comments of
    conf/**/*.yaml and the module docstrings under src/lmtrain."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"^```\w*\n(.*?)^```", readme, flags=re.M | re.S)
    lines = [line for block in blocks for line in block.splitlines()]
    for path in sorted((REPO / "conf").rglob("*.yaml")):
        stripped = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
        lines += [line[1:] for line in stripped if line.startswith("#")]
    for path in sorted((REPO / "src" / "lmtrain").rglob("*.py")):
        lines += (ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or "").splitlines()
    return list(dict.fromkeys(line.strip() for line in lines if line.strip().startswith("python -m lmtrain.")))


def is_placeholder(word: str) -> bool:
    """`...`, `<run>`, `a|b`, or a name in capitals (`N`, `out=DIR`)."""
    return "..." in word or "<" in word or "|" in word or re.fullmatch(r"[A-Z][A-Z_]*", word.split("=")[-1]) is not None


def as_typed(command: str, places: dict[str, str]) -> list[str]:
    """The words after `python -m` that a reader types: the comment left out, an optional [part] taken unless it
    holds a placeholder (`[--steps N]`, `[key=value ...]`), each placeholder filled in, `places` too."""
    words, typed, part, depth = shlex.split(re.sub(r"\s+#\s.*$", "", command))[2:], [], [], 0
    for word in words:
        if depth == 0 and not word.startswith("["):
            typed.append(word)
            continue
        depth += word.count("[") - word.count("]")
        part.append(word if part else word[1:])
        if depth == 0:
            part[-1] = part[-1][:-1]
            typed += [] if any(map(is_placeholder, part)) else part
            part = []
    line = shlex.join(typed)
    for written, filled in FILLED.items():
        line = re.sub(written, filled, line)
    for written, filled in places.items():
        line = line.replace(written, filled)
    return shlex.split(line)


def command_to_run(args: list[str], folder: str) -> list[str]:
    """A command as typed, made small and writing into `folder`; on a machine without the GPUs it names, its
    config composed (`--cfg job`) instead."""
    module, rest = args[0], args[1:]
    if GPU_ONLY.search(" ".join(rest)) and "--cfg" not in rest:
        gpus = next((int(w.split("=")[1]) for w in rest if w.startswith("trainer.devices=")), 1)
        if torch.cuda.device_count() < gpus:
            return ["lmtrain.train", "--cfg", "job", *(w for w in rest if "=" in w and not w.startswith("-"))]
    if module == "lmtrain.train" and "--cfg" not in rest:
        sweep = "-m" in rest
        sized = SHORT_RUN if not sweep else () if any(w.startswith("trainer.max_steps=") for w in rest) else SHORT_SWEEP
        into = [] if any(w.startswith("hydra.run.dir=") for w in rest) else [f"hydra.run.dir={folder}"]
        return [*args, *SMALL_MODEL, *sized, *([f"hydra.sweep.dir={folder}"] if sweep else into)]
    return [*args, *SMALLER.get(f"{module} {rest[0]}" if module == "lmtrain.bench" else module, ())]


def run_here(args: list[str], cwd: Path) -> tuple[int, str]:
    """`python -m <args>` from `cwd` inside this process (one import of torch and Lightning for all): the exit
    code and what it printed. The logging and Hydra's config of the run that Hydra's main leaves are put back."""
    from hydra.core.hydra_config import HydraConfig

    spec = importlib.util.find_spec(args[0])
    main = importlib.import_module(args[0] + (".__main__" if spec.submodule_search_locations else "")).main
    printed, hydra, code = io.TextIOWrapper(io.BytesIO(), write_through=True), HydraConfig.instance(), 0  # a .buffer
    handlers, level, hydra_cfg = logging.root.handlers[:], logging.root.level, hydra.cfg
    with process_state_kept(), mock.patch.object(sys, "argv", list(args)):
        os.chdir(cwd)
        try:
            with redirect_stdout(printed), redirect_stderr(printed):
                main()
        except SystemExit as exit_:
            code = exit_.code or 0
        finally:
            for handler in set(logging.root.handlers) - set(handlers):
                handler.close()
            logging.root.handlers[:], hydra.cfg = handlers, hydra_cfg
            logging.root.setLevel(level)
    return code, printed.buffer.getvalue().decode(errors="replace")


@pytest.mark.slow
def test_every_written_command_runs_as_written(tmp_path):
    """Each command of the README, the configs' comments and the module docstrings, with a reader's substitutions
    (placeholders filled, outputs into the test's folder, a size limit appended), exits 0; one that needs GPUs
    this machine lacks (fast=..., trainer=ddp) composes its config with `--cfg job`."""
    text = SHAKESPEARE.read_text(encoding="utf-8")[:30_000]  # the reader's own text files
    for name in ("data.txt", "my.txt", "corpus/part.txt"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text, encoding="utf-8")
    places = {"<run>": str(tmp_path / "run")}
    code, printed = run_here(command_to_run(["lmtrain.train", "experiment=seed"], places["<run>"]), tmp_path)
    assert code == 0, printed[-3000:]
    commands, failed = written_commands(), []
    assert len(commands) >= 20, commands  # the README's, the configs' and the docstrings' were found
    for i, command in enumerate(commands):
        args = as_typed(command, places)
        assert not [word for word in args if is_placeholder(word)], f"{command}: a placeholder the test cannot fill"
        ran = command_to_run(args, f"out/{i}")
        code, printed = run_here(ran, tmp_path)
        if code != 0:
            failed.append(f"{command}\n  ran: python -m {shlex.join(ran)}\n  exit {code}: {printed[-1500:]}")
        elif "-m" in ran and "--cfg" not in ran:
            places["<sweep>"] = str(tmp_path / "out" / str(i))
    assert not failed, "\n\n".join(failed)
