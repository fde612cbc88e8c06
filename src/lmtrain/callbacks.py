"""Callbacks: progress in optimizer steps, a sample at each evaluation, tokens per second, the run's summary.json
and its checkpoints."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import threading
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, Checkpoint, ModelCheckpoint, ProgressBar
from lightning.pytorch.utilities import rank_zero_only
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from .checkpointing import capture_rng_state, restore_rng_state
from .console import keep, say
from .errors import StoppedBySignal, UserError
from .fileio import atomic_write_bytes
from .lightning_patches import rewind_to_step_start
from .loggers import TensorBoard
from .tokenizer import encode_prompt


def tokens_per_step(trainer: L.Trainer) -> int:
    """Tokens in one optimizer step, over all devices."""
    data = trainer.datamodule
    return data.batch_size * data.block_size * trainer.accumulate_grad_batches * trainer.world_size


def generate_text(pl_module: L.LightningModule, prompt: str, max_new_tokens: int, *, seed: int, **options) -> str:
    """Sample from the module's model with its own generator: the training RNG streams are left alone."""
    tokenizer = pl_module.tokenizer
    idx = torch.tensor([encode_prompt(tokenizer, prompt, "prompt")], dtype=torch.long, device=pl_module.device)
    generator = torch.Generator(device=pl_module.device).manual_seed(seed)
    with pl_module.trainer.precision_plugin.forward_context():
        out = pl_module.model.generate(idx, max_new_tokens, generator=generator, **options)
    return tokenizer.decode(out[0].tolist())


class StepProgressBar(ProgressBar):
    """Rich progress in optimizer steps ("Training 120/600") and evaluation batches, redrawn `refresh_rate` times a
    second, with the newest train loss, val loss and bpc, learning rate and tokens/s beside it, and a line per
    evaluation above it. The numbers are those the module and Throughput already brought to the host at their
    logging interval: the bar costs no device sync. Lightning's RichProgressBar counts micro-batches against a
    total of optimizer steps (2400/600 under accumulation of 4), titles the one endless epoch of a step-bounded
    run "Epoch 0/-2", and offers no public way to change either."""

    def __init__(self, refresh_rate: float = 10):
        super().__init__()
        self.refresh_rate = refresh_rate
        self.enabled = True
        self.progress: Progress | None = None
        self.train_task: TaskID | None = None
        self.eval_task: TaskID | None = None

    def disable(self) -> None:
        self.enabled = False

    def enable(self) -> None:
        self.enabled = True

    def start(self) -> None:
        if self.enabled and self.progress is None:
            self.progress = Progress(
                TextColumn("{task.description:10}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("<"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[status]}"),
                refresh_per_second=self.refresh_rate,
            )
            self.progress.start()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start()
        if self.progress is not None:
            self.train_task = self.progress.add_task(
                "Training", total=trainer.max_steps, completed=trainer.global_step, status=""
            )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self.train_task is None:
            return
        update = {"completed": trainer.global_step}
        if trainer.global_step % trainer.log_every_n_steps == 0:
            update["status"] = status_line(trainer, pl_module)
        self.progress.update(self.train_task, **update)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.start()
        if self.progress is not None and not trainer.sanity_checking:
            self.eval_task = self.progress.add_task("Validation", total=sum(trainer.num_val_batches), status="")

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int, dataloader_idx: int = 0):
        if self.eval_task is not None:
            self.progress.advance(self.eval_task)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.eval_task is not None:
            self.progress.remove_task(self.eval_task)
            self.eval_task = None
        if self.progress is not None and not trainer.sanity_checking and trainer.is_global_zero:
            status = status_line(trainer, pl_module)
            line = f"step {trainer.global_step:>6}  {status}"
            self.progress.console.print(line)
            keep(line)
            if self.train_task is not None:
                self.progress.update(self.train_task, status=status)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.stop()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self.stop()

    def stop(self) -> None:
        if self.progress is not None:
            self.progress.stop()
        self.progress = self.train_task = self.eval_task = None


def status_line(trainer: L.Trainer, pl_module: L.LightningModule) -> str:
    """The newest values on the host: "loss 2.61  val 2.64  bpc 3.81  lr 3.0e-04  17,506 tok/s"."""
    metrics = getattr(pl_module, "host_metrics", {})
    parts = [
        f"{label} {metrics[key]:{form}}"
        for label, key, form in (
            ("loss", "train/loss", ".4f"),
            ("val", "val/loss", ".4f"),
            ("bpc", "val/bpc", ".3f"),
        )
        if key in metrics
    ]
    if trainer.optimizers:
        parts.append(f"lr {trainer.optimizers[0].param_groups[0]['lr']:.1e}")
    if "train/tokens_per_s" in metrics:
        parts.append(f"{metrics['train/tokens_per_s']:,.0f} tok/s")
    return "  ".join(parts)


class ModelSize(Callback):
    """One line before the first step: the parameters without the embeddings (as nanoGPT and the lesson count
    them) and with them, and the shape."""

    def __init__(self):
        self.shown = False

    @rank_zero_only
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.shown:
            return
        self.shown = True
        model, c = pl_module.model, pl_module.model.config
        say(
            f"model: {model.num_params(embeddings=False) / 1e6:.2f} M parameters, "
            f"{model.num_params() / 1e6:.2f} M with the embeddings ({c.n_layer} layers, {c.n_head} heads, "
            f"{c.n_embd} wide, block {c.block_size}, vocabulary {c.vocab_size})"
        )


class SampleText(Callback):
    """After each evaluation, a sample from `prompt` to TensorBoard's text tab and to samples.txt."""

    def __init__(
        self,
        path: str,
        prompt: str = "ROMEO:\n",
        max_new_tokens: int = 200,
        temperature: float = 0.8,
        top_k: int | None = 40,
        seed: int = 1234,
    ):
        self.path = Path(path)
        self.prompt, self.max_new_tokens = prompt, max_new_tokens
        self.temperature, self.top_k, self.seed = temperature, top_k, seed

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Before any step: a prompt the tokenizer cannot encode would stop the run at its first evaluation."""
        encode_prompt(pl_module.tokenizer, self.prompt, "callbacks.sample_text.prompt")

    @rank_zero_only
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        text = generate_text(
            pl_module, self.prompt, self.max_new_tokens, seed=self.seed, temperature=self.temperature, top_k=self.top_k
        )
        step = trainer.global_step
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(f"=== step {step} ===\n{text}\n\n")
        for logger in trainer.loggers:
            if hasattr(logger.experiment, "add_text"):
                logger.experiment.add_text("samples", f"```\n{text}\n```", step)


class Throughput(Callback):
    """Logs train/tokens_per_s over each logging interval, from host time alone (no device sync), at x = the
    updates made before the interval's last step, as the module's train metrics."""

    def __init__(self):
        self._since: tuple[float, int] | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.tokens_per_step = tokens_per_step(trainer)
        self._since = (time.perf_counter(), trainer.global_step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        start_time, start_step = self._since
        if step > start_step and step % trainer.log_every_n_steps == 0:
            now = time.perf_counter()
            rate = (step - start_step) * self.tokens_per_step / (now - start_time)
            for logger in trainer.loggers:  # straight to them: Lightning's self.log would copy it to the device
                logger.log_metrics({"train/tokens_per_s": rate}, step=step - 1)
            if hasattr(pl_module, "host_metrics"):
                pl_module.host_metrics["train/tokens_per_s"] = rate
            self._since = (now, step)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._since is not None:  # evaluation time is not training throughput
            self._since = (time.perf_counter(), trainer.global_step)


class RunSummary(Callback):
    """Tracks the best validation loss and its step; at the end writes summary.json and prints it as a line."""

    def __init__(self, path: str):
        self.path = Path(path)
        self.best = {"val_loss": math.inf}
        self.eval_s = 0.0  # evaluation and sampling, within fit
        self._start: tuple[float, int] | None = None

    def state_dict(self) -> dict:
        return {"best": self.best}

    def load_state_dict(self, state_dict: dict) -> None:
        self.best = state_dict["best"]

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = (time.perf_counter(), trainer.global_step)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._eval_start = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # runs after the sample callback listed before it, whose time counts as evaluation (checkpoints come last)
        if self._start is not None:
            self.eval_s += time.perf_counter() - self._eval_start
        metrics = trainer.callback_metrics
        if trainer.sanity_checking or "val/loss" not in metrics:
            return
        loss = float(metrics["val/loss"])
        if loss < self.best["val_loss"]:
            self.best = {
                "val_loss": loss,
                "val_ppl": float(metrics["val/ppl"]),
                "val_bpc": float(metrics["val/bpc"]),
                "step": trainer.global_step,
            }
        for logger in trainer.loggers:
            logger.log_metrics({"val/loss_best": self.best["val_loss"]}, step=trainer.global_step)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.write(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, StoppedBySignal):  # the run so far, up to the checkpoint it resumes from
            self.write(trainer)

    @rank_zero_only
    def write(self, trainer: L.Trainer) -> None:
        start_time, start_step = self._start or (time.perf_counter(), trainer.global_step)
        wall = time.perf_counter() - start_time
        best_ckpt = next(
            (
                cb.best_model_path
                for cb in trainer.checkpoint_callbacks
                if isinstance(cb, ModelCheckpoint) and cb.monitor == "val/loss"
            ),
            "",
        )
        summary = {
            "best_val_loss": self.best.get("val_loss"),
            "best_val_ppl": self.best.get("val_ppl"),
            "best_val_bpc": self.best.get("val_bpc"),
            "best_step": self.best.get("step"),
            "steps": trainer.global_step,
            "tokens_per_s": (trainer.global_step - start_step) * tokens_per_step(trainer) / max(wall, 1e-9),
            "wall_s": wall,
            "eval_s": self.eval_s,
            "best_ckpt": best_ckpt or None,
        }
        # JSON has no Infinity or NaN: a run without an evaluation has no best loss, null
        summary = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in summary.items()}
        self.log_results(trainer, summary)
        atomic_write_bytes(self.path, (json.dumps(summary, indent=2, allow_nan=False) + "\n").encode())
        say(summary_table(summary, self.path))

    @staticmethod
    def log_results(trainer: L.Trainer, summary: dict) -> None:
        """The run's results as metrics hparams/<name> (TensorBoard: its HPARAMS row, with the settings)."""
        train_loss = getattr(trainer.lightning_module, "host_metrics", {}).get("train/loss")
        results = {
            "best_val_loss": summary["best_val_loss"],
            "best_val_bpc": summary["best_val_bpc"],
            "best_step": summary["best_step"],
            "final_train_loss": train_loss if train_loss is not None and math.isfinite(train_loss) else None,
            "tokens_per_s": summary["tokens_per_s"],
        }
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoard):
                logger.log_results(results, trainer.global_step)
            else:
                metrics = {f"hparams/{name}": value for name, value in results.items() if value is not None}
                logger.log_metrics(metrics, trainer.global_step)


def summary_table(summary: dict, path: Path) -> str:
    """The end of a run, for a person: the best evaluation, the speed, where the files are."""
    rows = []
    if summary["best_val_loss"] is not None:
        rows.append(
            ("best val loss", f"{summary['best_val_loss']:.4f} at step {summary['best_step']} "
             f"(perplexity {summary['best_val_ppl']:.2f}, {summary['best_val_bpc']:.3f} bits per character)")
        )  # fmt: skip
    rows += [
        ("steps", f"{summary['steps']}"),
        ("speed", f"{summary['tokens_per_s']:,.0f} tokens/s"),
        ("wall time", f"{summary['wall_s']:.1f} s ({summary['eval_s']:.1f} s evaluating and sampling)"),
        ("checkpoints", str(path.parent / "checkpoints")),
        ("summary", str(path)),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n" + "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


class BestCheckpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, except that a non-finite monitored value is never the best: Lightning takes the
    first evaluation for the best whatever its value, and would keep diverged weights as best.ckpt."""

    def check_monitor_top_k(self, trainer: L.Trainer, current: torch.Tensor | None = None) -> bool:
        if current is not None and not torch.isfinite(current):
            return False
        return super().check_monitor_top_k(trainer, current)


STEP_FILE = re.compile(r"step-(\d+)\.ckpt")


class ResumeCheckpoints(Checkpoint):
    """Full checkpoints to resume from (model, optimizer, schedule, loops, RNG streams), step-NNNNNN.ckpt: every
    `every_n_steps` optimizer steps, the newest `keep_last` kept, and when training ends. On a step that also
    evaluates, the checkpoint is written after the evaluation: Lightning does not repeat the evaluation of the
    step it resumes at. `last.ckpt` links the newest, replaced atomically.

    SIGTERM or Ctrl-C stops training at the next micro-batch: the checkpoint is that of the last optimizer step
    (a step in progress is redone on resume, from the RNG state it began with), and StoppedBySignal ends fit
    without the evaluation Lightning runs on a stop. With several processes the ranks agree on a stop once per
    logging interval, at the end of a step. A second Ctrl-C interrupts at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, dirpath: str, every_n_steps: int, keep_last: int, eval_interval: int):
        self.dirpath = Path(dirpath)
        self.every_n_steps, self.keep_last, self.eval_interval = every_n_steps, keep_last, eval_interval
        self.received: int | None = None  # the signal that arrived
        self.stopping = False  # a stop agreed on (by every rank)
        self.step_done: int | None = None  # the optimizer step whose end was handled
        self.after_evaluation: int | None = None  # the step whose checkpoint waits for its evaluation
        self.saved_step: int | None = None
        self.previous_handlers: dict = {}
        self.rng_to_restore: dict | None = None  # from the checkpoint resumed, for the first micro-batch
        self.rng_at_step_start: dict | None = None
        self.micro_batches_into_step = 0  # when saving: those the checkpoint leaves for the resumed run to redo

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.step_done = trainer.global_step
        if trainer.ckpt_path and trainer.is_global_zero:  # instead of Lightning's "dataloader is not resumable"
            say(
                f"resumed from {trainer.ckpt_path} at step {trainer.global_step}: exactly, since micro-batch i is "
                "drawn from (seed, i) and the RNG streams continue from the checkpoint"
            )
        if threading.current_thread() is threading.main_thread():  # the only thread that may set signal handlers
            for signum in self.SIGNALS:
                self.previous_handlers[signum] = signal.signal(signum, self.on_signal)

    def on_signal(self, signum, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if self.rng_to_restore is not None:  # the first micro-batch after a resume continues the saved streams
            restore_rng_state(self.rng_to_restore)
            self.rng_to_restore = None
        if trainer.accumulate_grad_batches > 1 and batch_idx % trainer.accumulate_grad_batches == 0:
            self.rng_at_step_start = capture_rng_state()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step
        step_ended = step != self.step_done
        self.stopping = self.stopping or self.stop_agreed(trainer, step_ended)
        if not step_ended:  # a micro-batch within the optimizer step
            if self.stopping:
                self.micro_batches_into_step = batch_idx % trainer.accumulate_grad_batches + 1
                self.stop(trainer)
            return
        self.step_done = step
        if not (self.stopping or step % self.every_n_steps == 0):
            return
        if trainer.enable_validation and step % self.eval_interval == 0:
            self.after_evaluation = step
            return
        self.save(trainer)
        if self.stopping:
            self.stop(trainer)

    def stop_agreed(self, trainer: L.Trainer, step_ended: bool) -> bool:
        """Whether a signal arrived; with several processes, whether one did on any, asked at the end of a step
        once per logging interval, so that every rank stops at the same point."""
        if trainer.world_size > 1:
            if not step_ended or trainer.global_step % trainer.log_every_n_steps:
                return False
            if trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
                self.received = self.received or signal.SIGTERM
        return self.received is not None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn != "fit" or trainer.sanity_checking:  # not the evaluation before training
            return
        self.stopping = self.stopping or (trainer.world_size == 1 and self.received is not None)
        if self.after_evaluation == trainer.global_step or self.stopping:
            self.save(trainer)
            self.after_evaluation = None
        if self.stopping:
            self.stop(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.save(trainer)
        self.restore_handlers()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self.restore_handlers()

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if self.micro_batches_into_step:
            rewind_to_step_start(checkpoint, self.micro_batches_into_step)
            checkpoint["rng_state"] = self.rng_at_step_start
        else:
            checkpoint["rng_state"] = capture_rng_state()

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        self.rng_to_restore = checkpoint.get("rng_state")

    def stop(self, trainer: L.Trainer) -> None:
        """Write the checkpoint of the last optimizer step, then end fit."""
        path = self.save(trainer)
        self.micro_batches_into_step = 0
        signum = self.received or signal.SIGTERM
        message = ""
        if trainer.is_global_zero:
            message = (
                f"\nstopped by {signal.Signals(signum).name} after step {trainer.global_step}: "
                f"checkpoint {path}\nresume with: {resume_command()}"
            )
        raise StoppedBySignal(signum, message)

    def save(self, trainer: L.Trainer) -> Path:
        """This step's checkpoint (written once), last.ckpt pointing at it, older ones beyond keep_last removed."""
        path = self.dirpath / f"step-{trainer.global_step:06d}.ckpt"
        if self.saved_step == trainer.global_step:
            return path
        self.check_finite(trainer)
        trainer.save_checkpoint(path, weights_only=False)  # on every rank: a collective under sharded strategies
        self.saved_step = trainer.global_step
        if trainer.is_global_zero:
            link = self.dirpath / ".last.ckpt.tmp-link"
            link.unlink(missing_ok=True)
            link.symlink_to(path.name)
            os.replace(link, self.dirpath / "last.ckpt")
            self.remove_old(trainer.global_step)
        return path

    def check_finite(self, trainer: L.Trainer) -> None:
        """Weights that are no longer finite are not saved: last.ckpt keeps linking the last finite step's."""
        weights = list(trainer.lightning_module.parameters())
        if torch.stack([w.isfinite().all() for w in weights]).all():
            return
        self.restore_handlers()
        kept = "; last.ckpt still links the newest finite one" if (self.dirpath / "last.ckpt").exists() else ""
        raise UserError(
            f"the weights at step {trainer.global_step} are not finite (NaN or inf) and were not saved{kept}: "
            "resume from a checkpoint with a lower optim.max_lr, more warmup, or precision=bf16"
        )

    def remove_old(self, newest: int) -> None:
        """The step checkpoints before `newest` beyond the `keep_last` newest. Later ones, left by a run that
        went further before this one resumed from an earlier step, are overwritten as this run reaches them."""
        steps = {int(m[1]): p for p in self.dirpath.glob("step-*.ckpt") if (m := STEP_FILE.fullmatch(p.name))}
        older = sorted(step for step in steps if step < newest)
        for step in older[: max(len(older) - (self.keep_last - 1), 0)]:
            steps[step].unlink(missing_ok=True)

    def restore_handlers(self) -> None:
        for signum, handler in self.previous_handlers.items():
            signal.signal(signum, handler)
        self.previous_handlers = {}


def resume_command() -> str:
    """The command line that continues this run in its own folder."""
    try:
        from hydra.core.hydra_config import HydraConfig

        hydra = HydraConfig.get()
        overrides = [o for o in hydra.overrides.task if not o.startswith(("ckpt_path=", "hydra.run.dir="))]
        return " ".join(
            ["python -m lmtrain.train", *overrides, f"hydra.run.dir={hydra.runtime.output_dir}", "ckpt_path=last"]
        )
    except ValueError:  # not under Hydra (tests, the benchmark)
        return "python -m lmtrain.train <the same overrides> hydra.run.dir=<this run's folder> ckpt_path=last"
