"""`lmtrain.sample`, `lmtrain.schedule` and `lmtrain.check` as a user runs them."""

from __future__ import annotations

import re
import warnings

import pytest
import torch

from lmtrain import sample as sample_main
from lmtrain.check import accumulation_check, underflow_demo
from lmtrain.errors import UserError

from .conftest import compose, process_state_kept, run_cli, smoke_here, train_here


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("sample") / "run"
    smoke_here(run_dir)  # its files are all these tests need: trained here, no second import
    return run_dir / "checkpoints"


def sample(*args):
    return run_cli("lmtrain.sample", *args)


def test_sampling_prints_each_prompt_and_temperature_and_repeats_with_a_seed(checkpoint):
    args = (f"ckpt_path={checkpoint / 'best.ckpt'}", "max_new_tokens=40", "seed=3")
    first, second = sample(*args), sample(*args)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout
    out = first.stdout
    for prompt in ("'ROMEO:\\nO, '", "'JULIET:\\nMy '", "'Enter HAMLET\\n\\nHAMLET:\\n'", "'KING:\\nWe shall '"):
        assert f"Prompt: {prompt}" in out
    assert out.count("[temp=0.5]") == out.count("[temp=0.8]") == out.count("[temp=1.2]") == 4
    other_seed = sample(f"ckpt_path={checkpoint / 'best.ckpt'}", "max_new_tokens=40", "seed=4")
    assert other_seed.stdout != out


def test_sampling_options_and_newlines_in_prompts(checkpoint):
    result = sample(
        f"ckpt_path={checkpoint / 'last.ckpt'}",
        "prompts=['KING:\\nWe ']",
        "temperatures=[0.7]",
        "top_p=0.9",
        "top_k=null",
        "num_samples=2",
        "max_new_tokens=25",
        "use_cache=false",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("[temp=0.7]") == 2 and "KING:\nWe " in result.stdout


@pytest.mark.parametrize(
    "damage,words", [("missing", "does not exist"), ("truncated", "truncated"), ("tokenizer", "does not fit")]
)
def test_bad_checkpoints_are_clear_errors(checkpoint, tmp_path, damage, words):
    path = tmp_path / "bad.ckpt"
    if damage == "truncated":
        path.write_bytes((checkpoint / "best.ckpt").read_bytes()[:5000])
    elif damage == "tokenizer":  # a char model carrying GPT-2's tokenizer: two runs mixed into one file
        ckpt = torch.load(checkpoint / "best.ckpt", weights_only=False)
        ckpt["hyper_parameters"]["tokenizer_state"] = {"kind": "gpt2"}
        torch.save(ckpt, path)
    if damage != "missing":  # the same UserError in this process; the CLI's exit 2 is checked once, below
        with process_state_kept(), pytest.raises(UserError, match=words):
            sample_main.sample(compose(f"ckpt_path={path}", config_name="sample"))
        return
    result = sample(f"ckpt_path={path}")
    assert result.returncode == 2 and words in result.stderr and "Traceback" not in result.stderr


def test_schedule_draws_a_png_and_its_key_points_pass(tmp_path):
    out = tmp_path / "lr.png"
    result = run_cli("lmtrain.schedule", f"out={out}")
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    marks = [line for line in result.stdout.splitlines() if line.strip().startswith(("✓", "✗"))]
    assert len(marks) == 6 and all(line.strip().startswith("✓") for line in marks)
    for lr in ("1.500000e-06", "1.515000e-04", "3.000000e-04", "1.650000e-04", "3.000000e-05"):
        assert f"lr {lr}" in result.stdout


def test_schedule_rejects_an_impossible_schedule(tmp_path):
    result = run_cli("lmtrain.schedule", "optim.warmup_steps=900", "trainer.max_steps=100", f"out={tmp_path}/x.png")
    assert result.returncode == 2 and "warmup_steps" in result.stderr


def assert_only_the_checks_lines(result) -> None:
    """No warning, deprecation, tip or device line from the libraries: what the check prints, on stdout."""
    assert result.stderr == "", result.stderr
    assert not re.search(r"warn|deprecat|tip:|available:", result.stdout, flags=re.I), result.stdout


def test_check_accumulation_prints_match():
    result = run_cli("lmtrain.check", "accumulation")
    assert result.returncode == 0 and "match" in result.stdout and "MISMATCH" not in result.stdout
    assert result.stdout.count("\n") == 2
    assert_only_the_checks_lines(result)


def test_fp16_gradients_underflow_without_scaling_and_survive_with_it():
    demo = underflow_demo("cpu")
    assert demo["fp16 without scaling"] > 0.9 and demo["fp16 with GradScaler"] < 0.01


def test_check_precision_runs_on_this_machine():
    result = run_cli("lmtrain.check", "precision")
    assert result.returncode == 0 and "keeps the gradients" in result.stdout and "bfloat16" in result.stdout
    assert_only_the_checks_lines(result)


@pytest.mark.parametrize(
    "option,words",
    [
        ("top_p=0", "top_p=0.0 must be in (0, 1]"),
        ("temperatures=[nan]", "temperature=nan must be 0 (greedy) or a positive finite number"),
        ("temperatures=[-1]", "temperature=-1.0 must be 0"),
        ("top_k=0", "top_k=0 must be at least 1"),
        ("max_new_tokens=-1", "max_new_tokens=-1 must not be negative"),
        ('prompts=["\u03a9"]', "prompts='\u03a9' cannot be encoded: character '\u03a9' is not in the char"),
    ],
)
def test_impossible_sampling_settings_are_one_line_errors(checkpoint, option, words):
    cfg = compose(f"ckpt_path={checkpoint / 'last.ckpt'}", option, config_name="sample")
    with pytest.raises(UserError, match=re.escape(words)):
        sample_main.sample(cfg)


def test_a_training_sample_prompt_outside_the_vocabulary_stops_the_run_before_its_first_step(tmp_path):
    result = train_here(tmp_path, "experiment=smoke", 'callbacks.sample_text.prompt="\u03a9"')
    assert result.returncode == 2 and "change callbacks.sample_text.prompt" in result.stderr
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


def test_check_accumulation_is_quiet_on_a_machine_with_a_gpu(monkeypatch):
    """It runs on the CPU on purpose: Lightning's "GPU available but not used" is not for the reader."""
    from lightning.pytorch.trainer import setup

    monkeypatch.setattr(setup.CUDAAccelerator, "is_available", staticmethod(lambda: True))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, match = accumulation_check()
    assert match and not [w for w in caught if "GPU available" in str(w.message)]
