"""The LightningModule: next-token loss, metrics without per-step host syncs, AdamW + warmup/cosine."""

from __future__ import annotations

import math
import os
import statistics
from dataclasses import fields

import lightning as L
import torch

from .errors import UserError
from .lr_schedule import warmup_cosine
from .model import GPT, GPTConfig
from .optim import OptimConfig, build_optimizer, clip_gradients_
from .precision import PRECISIONS, Precision
from .tokenizer import from_state

# What a checkpoint's weights depend on; dropout may change between runs.
ARCHITECTURE = tuple(f.name for f in fields(GPTConfig) if f.name != "dropout")


def gpt_config(model: dict) -> GPTConfig:
    """The GPTConfig of a model config or a checkpoint's (older ones hold speed switches too, now under fast)."""
    return GPTConfig(**{key: value for key, value in model.items() if key in ARCHITECTURE or key == "dropout"})


class LanguageModel(L.LightningModule):
    def __init__(
        self,
        *,
        model: dict,
        optim: dict,
        max_steps: int,
        tokenizer_state: dict,
        chars_per_token: dict,
        bytes_per_token: dict | None = None,
        max_nonfinite_steps: int = 10,
        tokenizer=None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["tokenizer"], logger=False)
        self.model = GPT(gpt_config(model))
        self.optim_config = OptimConfig(**optim)
        self._tokenizer = tokenizer
        # The plain loss; lmtrain.fast may swap faster forms of the same math in, and keep gradient buffers.
        self.train_loss = self.model.loss
        self.eval_loss = self.model.loss
        self.keep_gradient_buffers = False
        self._unread_train_metrics = None  # (step, values on their way to the host, CUDA event)
        self.host_metrics: dict[str, float] = {}  # the newest values logged, already on the host (the terminal's)

    @property
    def tokenizer(self):
        """The run's tokenizer; after Lightning's load_from_checkpoint, which passes only the saved
        hyperparameters, rebuilt from its saved state (GPT-2's files from LMTRAIN_CACHE or the mirror)."""
        if self._tokenizer is None:
            cache = os.environ.get("LMTRAIN_CACHE", "~/.cache/lmtrain")
            self._tokenizer = from_state(self.hparams.tokenizer_state, cache, os.environ.get("LMTRAIN_DATA_MIRROR"))
        return self._tokenizer

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The mean next-token loss of token ids x (B, T) against targets y (B, T)."""
        return self.model.loss(x, y)

    # --- training -------------------------------------------------------------------------------
    def on_train_start(self) -> None:
        self._loss_sum = torch.zeros((), device=self.device)
        self._nonfinite = torch.zeros(2, device=self.device)  # (total, in a row)
        self._recent_losses: list[float] = []

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer) -> None:
        optimizer.zero_grad(set_to_none=not self.keep_gradient_buffers)

    def on_validation_model_zero_grad(self) -> None:
        # Lightning frees the gradients before each evaluation; buffers accumulated in place must stay.
        if not self.keep_gradient_buffers:
            super().on_validation_model_zero_grad()

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss = self.train_loss(*batch)
        self._loss_sum.add_(loss.detach())
        return loss

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Lightning's clipping hook (after unscaling under fp16): clip, then hold back a non-finite update."""
        self._grad_norm = clip_gradients_(self.trainer.model, optimizer, gradient_clip_val)
        self.hold_back_nonfinite_update(optimizer, self._grad_norm, PRECISIONS[str(self.trainer.precision)])

    def hold_back_nonfinite_update(self, optimizer, grad_norm: torch.Tensor, precision: Precision) -> None:
        """A non-finite loss or gradient must not reach the weights: the optimizer skips the update on the device
        (found_inf, as a GradScaler passes it: no host sync). The skips are counted, total and in a row."""
        bad = (~torch.isfinite(grad_norm)).float()  # 0-d: 1.0 for a step to skip
        self._nonfinite.add_(bad)
        self._nonfinite[1].mul_(bad)
        if not precision.loss_scaling:  # under fp16 the GradScaler skips such steps itself
            optimizer.found_inf = bad

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        step = self.global_step  # updates made before this one: the x of this step's metrics
        optimizer.step(closure=optimizer_closure)
        self._log_train_step(step, self._grad_norm)

    def _check_nonfinite_streak(self, total: float, streak: float, step: int) -> None:
        total, streak, limit = int(total), int(streak), self.hparams.max_nonfinite_steps
        if streak >= limit:
            raise UserError(
                f"{streak} optimizer steps in a row (up to step {step}) had a non-finite loss or "
                f"gradient and were skipped ({total} in all; the limit is trainer.max_nonfinite_steps={limit}); "
                "the weights are those of the last finite step and the checkpoints are kept: resume from one with a "
                "lower optim.max_lr, more warmup, or precision=bf16"
            )

    def _log_train_step(self, step: int, grad_norm: torch.Tensor) -> None:
        """train/loss (the mean over this step's micro-batches), train/grad_norm and the count of skipped
        non-finite steps of every log_every_n_steps-th step, at x = updates made before this step, as the
        validation metrics, the learning rate and tokens/s: a run of 60 steps logs them at 9, 19, ..., 59. On a
        GPU they are copied to the host without waiting and written one interval later, when the copy is long
        done: the device is never synchronised for them."""
        if (step + 1) % self.trainer.log_every_n_steps == 0:
            values = torch.stack(
                [self._loss_sum / self.trainer.accumulate_grad_batches, grad_norm.float(), *self._nonfinite]
            )
            self._write_train_metrics()  # the previous interval's
            host, copied = copy_to_host_async(values)
            self._unread_train_metrics = (step, host, copied)
            if copied is None:  # already on the host
                self._write_train_metrics()
        self._loss_sum.zero_()

    def _write_train_metrics(self) -> None:
        if self._unread_train_metrics is None:
            return
        step, values, copied = self._unread_train_metrics
        self._unread_train_metrics = None
        if copied is not None:
            copied.synchronize()
        loss, grad_norm, total, streak = values.tolist()
        metrics = {"train/loss": loss, "train/grad_norm": grad_norm, "train/nonfinite_steps": total}
        if self._is_spike(loss):
            metrics["train/loss_spike"] = loss
        for logger in self.loggers:
            logger.log_metrics(metrics, step=step)
        self.host_metrics.update(metrics)
        self._check_nonfinite_streak(total, streak, step)

    def on_train_end(self) -> None:
        self._write_train_metrics()

    def _is_spike(self, loss: float, window: int = 10, factor: float = 1.3) -> bool:
        """Above `factor` times the median of the last `window` logged losses (the report's rule)."""
        recent = self._recent_losses
        spike = len(recent) == window and math.isfinite(loss) and loss > factor * statistics.median(recent)
        recent.append(loss)
        del recent[:-window]
        return spike

    # --- evaluation -----------------------------------------------------------------------------
    EVAL_SPLITS = ("val", "train")  # the order of the data module's val_dataloader()

    def on_validation_epoch_start(self) -> None:
        self._eval_sums = torch.zeros(len(self.EVAL_SPLITS), 2, device=self.device)  # (loss * tokens, tokens)

    def validation_step(self, batch, batch_idx: int, dataloader_idx: int = 0) -> None:
        x, y = batch
        loss = self.eval_loss(x, y)
        self._eval_sums[dataloader_idx, 0] += loss * y.numel()
        self._eval_sums[dataloader_idx, 1] += y.numel()

    def on_validation_epoch_end(self) -> None:
        sums = self.trainer.strategy.reduce(self._eval_sums, reduce_op="sum")
        metrics = {}
        for split, (loss_sum, tokens) in zip(self.EVAL_SPLITS, sums):
            if tokens == 0:
                continue
            loss = loss_sum / tokens
            bpc = loss / math.log(2) / self.hparams.chars_per_token[split]
            if split == "val":
                metrics.update({"val/loss": loss, "val/ppl": loss.exp(), "val/bpc": bpc})
                if self.hparams.bytes_per_token:  # bits per byte, the unit web-scale results use
                    metrics["val/bpb"] = loss / math.log(2) / self.hparams.bytes_per_token[split]
            else:
                metrics.update({"train/eval_loss": loss, "train/eval_bpc": bpc})
        # For checkpointing and callbacks; the loggers get the values at x = optimizer steps taken,
        # the weights they were measured with (train/loss at step s was measured before update s + 1).
        self.log_dict(metrics, on_step=False, on_epoch=True, logger=False)
        values = {name: float(value) for name, value in metrics.items()}
        for logger in self.loggers:
            logger.log_metrics(values, step=self.global_step)
        self.host_metrics.update(values)

    # --- optimizer and schedule -----------------------------------------------------------------
    def optimizer_and_schedule(self, device_type: str, precision: str):
        """AdamW (or Muon + AdamW), fused where the device and precision allow, and its warmup + cosine LambdaLR."""
        config = self.optim_config
        fused = config.fused
        if fused is None:
            fused = device_type == "cuda" and not PRECISIONS[precision].loss_scaling
        optimizer = build_optimizer(self.model, config, fused=fused)
        scheduler = warmup_cosine(
            optimizer,
            warmup_steps=config.warmup_steps,
            max_steps=self.hparams.max_steps,
            max_lr=config.max_lr,
            min_lr=config.min_lr,
        )
        return optimizer, scheduler

    def configure_optimizers(self):
        optimizer, scheduler = self.optimizer_and_schedule(self.device.type, str(self.trainer.precision))
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1, "name": "lr"},
        }

    # --- checkpoints ---------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self._write_train_metrics()
        for logger in self.loggers:  # flushed: a run killed after this checkpoint keeps the points logged before it
            logger.save()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._check_same_model(checkpoint.get("hyper_parameters", {}))

    @property
    def trainer_attached(self) -> bool:
        try:
            return self.trainer is not None
        except RuntimeError:  # Lightning's way to say there is none
            return False

    def _check_same_model(self, saved: dict) -> None:
        """A checkpoint resumes only the model and tokenizer it was trained with."""
        ours, saved_model = self.hparams.model, saved.get("model", {})
        defaults = GPTConfig()  # what a checkpoint from before an option was added was trained with
        theirs = {k: saved_model.get(k, getattr(defaults, k)) for k in ARCHITECTURE}
        differences = [f"model.{k}={theirs[k]} (config: {ours[k]})" for k in ARCHITECTURE if theirs[k] != ours[k]]
        if saved.get("tokenizer_state") != self.hparams.tokenizer_state:
            differences.append(
                f"tokenizer {saved.get('tokenizer_state', {}).get('kind')} "
                f"(config: {self.hparams.tokenizer_state['kind']}, or other settings)"
            )
        if differences:
            path = self.trainer.ckpt_path if self.trainer_attached else "the checkpoint"
            raise UserError(
                f"checkpoint {path} does not match the config: it has {', '.join(differences)}; resume with the "
                "config it was trained with (its run's .hydra/config.yaml) or start a new run"
            )


def copy_to_host_async(values: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """A copy of `values` on the host, without waiting for the device: read it after event.synchronize()."""
    if not values.is_cuda:
        return values, None
    host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
    host.copy_(values, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()
    return host, copied
