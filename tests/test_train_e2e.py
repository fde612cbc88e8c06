"""`python -m lmtrain.train` end to end, as a user runs it: outputs, resume, and bad input."""

from __future__ import annotations

import hashlib
import json
import math
import re

import pytest
import torch

from lmtrain.callbacks import StepProgressBar
from lmtrain.check import accumulation_check
from lmtrain.config import validate
from lmtrain.errors import UserError
from lmtrain.model import GPTConfig
from lmtrain.module import LanguageModel
from lmtrain.train import train

from .conftest import REPO, compose, process_state_kept, run_cli, scalars, smoke_here, train_here

TAGS = {"train/loss", "train/grad_norm", "train/tokens_per_s", "val/loss", "val/ppl", "val/bpc"}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("smoke") / "run"
    result = smoke_here(run_dir)
    return run_dir, result


def test_smoke_run_writes_checkpoints_samples_summary_and_tensorboard(smoke_run):
    run_dir, result = smoke_run
    checkpoints = {p.name for p in (run_dir / "checkpoints").iterdir()}
    assert {"best.ckpt", "last.ckpt", "step-000060.ckpt"} <= checkpoints
    samples = (run_dir / "samples.txt").read_text()
    assert samples.count("ROMEO:") == 4  # steps 0, 20, 40, 60
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 60 and summary["best_step"] in (20, 40, 60)
    assert summary["best_val_ppl"] == pytest.approx(math.exp(summary["best_val_loss"]), rel=1e-5)
    assert summary["tokens_per_s"] > 0 and summary["best_ckpt"].endswith("best.ckpt")
    # for a person, the end of the run: the best evaluation, the speed, where the files are
    best_line = f"best val loss  {summary['best_val_loss']:.4f} at step {summary['best_step']} (perplexity"
    assert best_line in result.stdout and f"{summary['best_val_bpc']:.3f} bits per character" in result.stdout
    assert f"checkpoints    {run_dir / 'checkpoints'}" in result.stdout
    # while training: the model's size, a line per evaluation with the numbers the bar shows beside it
    assert re.search(r"model: \d+\.\d\d M parameters, \d+\.\d\d M with the embeddings \(2 layers", result.stdout)
    line = r"^step +(\d+)  loss (\d+\.\d{4})  val (\d+\.\d{4})  bpc \d\.\d{3}  lr"
    evaluations = re.findall(line, result.stdout, re.M)
    assert [int(step) for step, _, _ in evaluations] == [20, 40, 60]
    logged = dict(scalars(run_dir)["val/loss"])
    assert all(float(val) == pytest.approx(logged[int(step)], abs=1e-4) for step, _, val in evaluations)

    series = scalars(run_dir)
    assert TAGS <= set(series) and any(tag.startswith("lr") for tag in series)
    assert sorted(dict(series["train/eval_loss"])) == [0, 20, 40, 60]  # both splits at each evaluation
    val = dict(series["val/loss"])
    assert sorted(val) == [0, 20, 40, 60] and val[60] < val[0]
    assert val[0] == pytest.approx(math.log(65), abs=0.15)  # the untrained model: uniform over 65 characters
    for step, loss in series["val/loss"]:
        assert dict(series["val/ppl"])[step] == pytest.approx(math.exp(loss), rel=1e-5)
        assert dict(series["val/bpc"])[step] == pytest.approx(loss / math.log(2), rel=1e-5)  # 1 char per token


def test_evaluations_may_skip_the_training_split(smoke_run, tmp_path):
    run_dir = tmp_path / "run"
    smoke_here(run_dir, "trainer.eval_train=false")
    series = scalars(run_dir)
    assert "train/eval_loss" not in series and "train/eval_bpc" not in series
    # the same evaluations of the validation split as with both splits: same windows, same weights
    both = scalars(smoke_run[0])["val/loss"]
    assert [s for s, _ in series["val/loss"]] == [s for s, _ in both]
    assert [v for _, v in series["val/loss"]] == pytest.approx([v for _, v in both], abs=1e-4)


def test_checkpoint_keys_are_plain_and_last_points_at_the_newest(smoke_run):
    run_dir, _ = smoke_run
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 60
    assert all(key.startswith("model.") and "_orig_mod" not in key for key in last["state_dict"])
    assert last["hyper_parameters"]["tokenizer_state"]["kind"] == "char"
    assert {"python", "numpy", "torch"} <= set(last["rng_state"])


def test_resume_continues_the_step_count_and_schedule(tmp_path):
    run_dir = tmp_path / "run"
    smoke_here(run_dir, "trainer.max_steps=40")
    smoke_here(run_dir, "trainer.max_steps=60", f"ckpt_path={run_dir}/checkpoints/last.ckpt")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 60
    steps = sorted(s for s, _ in scalars(run_dir)["train/loss"])
    assert steps == [9, 19, 29, 39, 49, 59]  # every 10th step, at the updates before it; 49, 59 by the resumed run
    for tag in ("lr/decay", "train/tokens_per_s"):  # one convention: the curves end together
        assert sorted(s for s, _ in scalars(run_dir)[tag]) == steps, tag


def test_the_last_step_is_always_checkpointed(tmp_path):
    run_dir = tmp_path / "run"
    smoke_here(run_dir, "trainer.max_steps=25", "checkpoint.every_n_steps=20", "trainer.eval_interval=100")
    last = run_dir / "checkpoints" / "last.ckpt"
    assert last.resolve().name == "step-000025.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 25


def test_a_periodic_checkpoint_on_an_evaluating_step_is_written_after_the_evaluation(tmp_path):
    run_dir = tmp_path / "run"
    overrides = ("trainer.max_steps=40", "checkpoint.every_n_steps=10", "checkpoint.keep_last=10")
    smoke_here(run_dir, *overrides, "trainer.eval_interval=20")
    for step, best_seen_at in ((10, 0), (20, 20), (30, 20)):
        state = torch.load(run_dir / "checkpoints" / f"step-{step:06d}.ckpt", weights_only=False)
        assert state["global_step"] == step
        assert state["callbacks"]["RunSummary"]["best"]["step"] == best_seen_at  # step 20's evaluation is in


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    "overrides,words,cli",  # cli: through `python -m lmtrain.train` (a UserError, a Hydra error), else in-process
    [
        (["data=text", "data.path=__BIN__"], "utf", True),
        (["model.n_head=5"], "n_head", False),
        (["model.n_layerz=2"], "n_layerz", True),
        (["optim.warmup_steps=100000"], "warmup", False),
    ],
)
def test_bad_input_is_one_line_exit_2_and_touches_no_earlier_run(smoke_run, tmp_path, overrides, words, cli):
    run_dir, _ = smoke_run
    before = {p.name: _sha(p) for p in (run_dir / "checkpoints").iterdir()}
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00bad\xc3" * 100)
    args = [o.replace("__BIN__", str(binary)) for o in overrides]
    if cli:
        result = run_cli("lmtrain.train", "experiment=smoke", f"hydra.run.dir={run_dir}", *args)
    else:
        result = train_here(run_dir, "experiment=smoke", *args)
        assert isinstance(result.error, UserError), result.error  # not a Hydra error: ours, with our message
    assert result.returncode == 2, result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1 and words in error_lines[0].lower()
    assert "Traceback" not in result.stderr + result.stdout
    assert {p.name: _sha(p) for p in (run_dir / "checkpoints").iterdir()} == before


def test_checkpoint_from_another_model_is_a_clear_error(smoke_run, tmp_path):
    run_dir, _ = smoke_run
    result = train_here(
        tmp_path / "other", "experiment=smoke", "model.n_embd=96", f"ckpt_path={run_dir}/checkpoints/last.ckpt"
    )
    assert result.returncode == 2 and "does not match" in result.stderr, result.stderr[-2000:]
    assert isinstance(result.error, UserError)


@pytest.mark.parametrize("norm,resumes", [("layernorm", True), ("rms", False)])
def test_a_checkpoint_from_before_an_option_existed_counts_as_its_default(norm, resumes):
    model = {**GPTConfig(n_layer=1, n_head=2, n_embd=32, vocab_size=65).__dict__, "norm": norm}
    module = LanguageModel(
        model=model, optim={}, max_steps=1, tokenizer_state={"kind": "char"}, chars_per_token={"val": 1.0}
    )
    saved = {"model": {k: v for k, v in model.items() if k != "norm"}, "tokenizer_state": {"kind": "char"}}
    if resumes:
        module._check_same_model(saved)
    else:
        with pytest.raises(UserError, match=r"model.norm=layernorm \(config: rms\)"):
            module._check_same_model(saved)


def test_accumulated_gradients_equal_the_whole_batch_through_the_trainer():
    difference, match = accumulation_check(batch_size=8, micro_batches=4)
    assert match and difference < 1e-6


def test_the_progress_bar_counts_optimizer_steps(tmp_path, monkeypatch):
    seen = []

    def recording(self, trainer, pl_module):
        seen.extend((t.description, t.completed, t.total) for t in self.progress.tasks if t.id == self.train_task)

    monkeypatch.setattr(StepProgressBar, "on_train_end", recording)
    with process_state_kept():
        train(
            compose(
                "experiment=smoke",
                f"output_dir={tmp_path}",
                "trainer.max_steps=6",
                "optim.warmup_steps=2",
                "trainer.accumulate_grad_batches=2",  # Lightning's own bar: 12/6, "Epoch 0/-2"
                "trainer.eval_interval=6",
                "trainer.eval_batches=1",
                "callbacks.model_summary=null",
            )
        )
    description, completed, total = seen[-1]
    assert (completed, total) == (6, 6) and description.strip() == "Training"


def test_a_run_without_an_evaluation_writes_valid_json_with_no_best(tmp_path):
    smoke_here(tmp_path, "trainer.max_steps=20", "trainer.eval_interval=1000", "trainer.eval_at_start=false")

    def refuse(constant):
        raise AssertionError(f"summary.json holds {constant}, which JSON does not have")

    summary = json.loads((tmp_path / "summary.json").read_text(), parse_constant=refuse)
    assert summary["best_val_loss"] is None and summary["steps"] == 20


def test_precision_auto_fits_the_machine_and_bf16_runs_on_a_cpu_too(tmp_path, capsys):
    """The README's commands name precision=bf16; on a machine without a GPU they run (Lightning's CPU autocast),
    saying once that fp32 is faster there; precision=auto, the default, picks that."""
    cfg = compose()
    validate(cfg)
    gpu_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    assert cfg.trainer.precision == ("bf16-mixed" if gpu_bf16 else "32-true")
    result = train_here(tmp_path / "run", "experiment=smoke", "precision=bf16", "trainer.max_steps=4",
                        "optim.warmup_steps=0", "trainer.eval_interval=2")  # fmt: skip
    assert result.returncode == 0, result.stderr
    notes = capsys.readouterr().err.count("note: precision=bf16 on the CPU")
    assert notes == 1  # smoke trains on the CPU (trainer=cpu), a GPU or not
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["best_val_loss"] < math.log(65)


def test_a_run_shorter_than_its_warmup_names_the_override_to_add():
    with pytest.raises(UserError, match=r"optim.warmup_steps=10 exceeds trainer.max_steps=3; add optim.warmup_steps=0"):
        validate(compose("experiment=smoke", "trainer.max_steps=3"))


def test_the_readmes_python_loads_a_checkpoint_with_its_tokenizer_and_generates(smoke_run, capsys):
    run_dir, _ = smoke_run
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    (snippet,) = re.findall(r"```python\n(.*?)```", readme, re.S)
    exec(snippet.replace("outputs/<run>", str(run_dir)), {})  # as written, but for the run's folder
    printed = capsys.readouterr().out
    assert printed.startswith("ROMEO:\n") and len(printed) > len("ROMEO:\n") + 50


def test_tensorboard_has_one_event_file_and_an_hparams_row_with_the_results(smoke_run):
    """The evaluation before training shares the event file; HPARAMS holds the settings that tell runs apart and
    the run's results (no NaN point, no row before there are results)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    run_dir, _ = smoke_run
    (events,) = run_dir.glob("tb/*/events.out.tfevents.*")
    reader = EventAccumulator(str(events), size_guidance={"tensors": 0, "scalars": 0})
    reader.Reload()
    experiment = None
    for content in reader.PluginTagToContent("hparams").values():
        data = plugin_data_pb2.HParamsPluginData.FromString(content)
        experiment = data.experiment if data.HasField("experiment") else experiment
    names = [info.name for info in experiment.hparam_infos]
    assert {"optim.max_lr", "optim.warmup_steps", "model.n_layer", "trainer.precision"} <= set(names)
    assert len(names) < 25  # not the whole config: that is in .hydra/config.yaml
    assert "hparams/best_val_bpc" in {m.name.tag for m in experiment.metric_infos}
    summary = json.loads((run_dir / "summary.json").read_text())
    (best_bpc,) = reader.Scalars("hparams/best_val_bpc")
    assert best_bpc.value == pytest.approx(summary["best_val_bpc"]) and best_bpc.step == summary["steps"]
    assert all(math.isfinite(point.value) for point in reader.Scalars("val/loss_best"))
