"""The LightningModule: next-token loss, metrics without per-step host syncs, AdamW + warmup/cosine."""

from __future__ import annotations

import math
import random
import statistics
from functools import partial

import lightning as L
import numpy as np
import torch

from .config import AUTOCAST_DTYPES, SINGLE_PROCESS_OPTIONS
from .errors import UserError
from .lr_schedule import warmup_cosine
from .model import GPT, GPTConfig
from .optim import OptimConfig, build_optimizer, skips_on_device
from .weight_copies import WeightCopies

# What a checkpoint's weights depend on; dropout and initialisation may change between runs.
ARCHITECTURE = (
    "vocab_size",
    "block_size",
    "n_layer",
    "n_head",
    "n_embd",
    "bias",
    "rope",
    "qk_norm",
    "mlp",
    "norm",
    "vocab_multiple",
)
FUSED_PRECISIONS = {"bf16-mixed", "bf16-true", "32-true", "32"}  # no GradScaler that must unscale first


class SkippedStep(Exception):
    """Raised inside the optimizer's closure to leave the weights untouched this step."""


class LanguageModel(L.LightningModule):
    def __init__(
        self,
        *,
        model: dict,
        optim: dict,
        max_steps: int,
        tokenizer_state: dict,
        chars_per_token: dict,
        compile: bool = False,
        compile_mode: str | None = None,
        compile_scope: str = "model",
        loss_chunk_rows: int = 0,
        fused_loss: bool = False,
        cast_weights_once: bool = False,
        cuda_graphs: bool = False,
        max_nonfinite_steps: int = 10,
        tokenizer=None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["tokenizer"], logger=False)
        self.model = GPT(GPTConfig(**model))
        self.optim_config = OptimConfig(**optim)
        self.tokenizer = tokenizer
        self.loss_fn = partial(self.model.loss, chunk_rows=loss_chunk_rows, fused=fused_loss)
        if compile and compile_scope == "blocks":
            self.model.compile_blocks(compile_mode)
        self._compile_loss = compile and compile_scope == "model"
        self.weight_copies: WeightCopies | None = None  # see use_weight_copies
        self.train_loss = self._training_loss()
        # Inductor's CUDA graph trees (compiled), or the uncompiled loss replayed from graphs (model.cuda_graphs)
        self._graph_trees = compile and compile_mode in ("reduce-overhead", "max-autotune")
        self._cudagraphs = cuda_graphs or self._graph_trees
        self._grads_in_place = False  # set when training starts; see grads_in_place
        self._graphs_captured = False  # model.cuda_graphs: captured at the first training step
        self._rng_to_restore = None
        self._unread_train_metrics = None  # (step, values on their way to the host, CUDA event)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The mean next-token loss of token ids x (B, T) against targets y (B, T)."""
        return self.loss_fn(x, y)

    def _training_loss(self):
        """The training step's loss function: with the weight copies in place of the weights if they are used,
        compiled if asked. Kept out of the module tree: checkpoints hold plain `model.` keys."""
        loss = self.loss_fn
        if self.weight_copies is not None:
            copies = {f"model.{name}": copy for name, copy in self.weight_copies.copies.items()}
            loss = partial(_call_with, self, copies)
        return torch.compile(loss, mode=self.hparams.compile_mode) if self._compile_loss else loss

    def capture_training_loss(self, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype | None) -> None:
        """Capture the training loss's forward and backward as CUDA graphs for batches shaped like (x, y); later
        calls replay them, two launches instead of one per kernel. Its warm-up passes draw random numbers the run
        does not keep, so dropout draws what the uncaptured model would. `dtype`: autocast's, or None."""
        with (
            torch.random.fork_rng(devices=[x.device] if x.is_cuda else []),
            torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None, cache_enabled=False),
        ):  # autocast's weight cache would freeze the weights the capture cast
            graphed = torch.cuda.make_graphed_callables(
                _Loss(self.model, self.loss_fn), (x, y), allow_unused_input=True
            )
        self.train_loss = graphed.forward  # a function: the module would join the module tree and its checkpoints
        self._graphs_captured = True

    def use_weight_copies(self, dtype: torch.dtype) -> None:
        """Train with copies of the matmul weights in the autocast dtype (see WeightCopies)."""
        self.weight_copies = WeightCopies(self.model, dtype)
        self.train_loss = self._training_loss()

    # --- training -------------------------------------------------------------------------------
    def on_train_start(self) -> None:
        self._loss_sum = torch.zeros((), device=self.device)
        self._nonfinite = torch.zeros(2, device=self.device)
        self._recent_losses: list[float] = []
        self._grads_in_place = grads_in_place(self, self.trainer.accumulate_grad_batches)
        single_process = [key for key in SINGLE_PROCESS_OPTIONS if self.hparams[key]]
        if single_process and self.trainer.world_size > 1:
            raise UserError(
                f"model.{single_process[0]} trains one process, not {self.trainer.world_size} "
                f"(use model.{single_process[0]}=false)"
            )
        if self.hparams.cast_weights_once:
            self.use_weight_copies(AUTOCAST_DTYPES[str(self.trainer.precision)])

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer) -> None:
        if self.weight_copies is not None:  # first: zeroing gradients about to be freed would be a wasted pass
            self.weight_copies.release_grads()
        optimizer.zero_grad(set_to_none=not self._grads_in_place)

    def on_validation_model_zero_grad(self) -> None:
        # Lightning frees the gradients before each evaluation. Buffers that accumulate in place must stay: a
        # gradient set from None is the CUDA graph's output, which the next micro-batch overwrites (measured:
        # seed val 5.68 instead of 5.59 at step 100 with evaluations every 50 steps).
        if not self._grads_in_place:
            super().on_validation_model_zero_grad()

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        if self._rng_to_restore is not None:  # first step after a resume: continue the saved RNG streams
            restore_rng_state(self._rng_to_restore)
            self._rng_to_restore = None

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        if self._graph_trees:  # each micro-batch is a new iteration: earlier graph outputs may be reused
            torch.compiler.cudagraph_mark_step_begin()  # (imports Inductor: ~1 s at the first step)
        if self.hparams.cuda_graphs and not self._graphs_captured:
            self.capture_training_loss(x, y, AUTOCAST_DTYPES.get(str(self.trainer.precision)))
        loss = self.train_loss(x, y)
        self._loss_sum.add_(loss.detach())
        return loss

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        # Clipping here rather than through the precision plugin lets fused AdamW clip under bf16
        # (Lightning refuses to clip for optimizers that unscale internally; bf16 has nothing to unscale).
        max_norm = gradient_clip_val if gradient_clip_val else math.inf
        wrapped = self.trainer.model
        if hasattr(wrapped, "clip_grad_norm_"):  # FSDP: the norm over every rank's shard
            norm = wrapped.clip_grad_norm_(max_norm)
        elif optimizer.defaults.get("fused"):
            norm = torch.nn.utils.get_total_norm([p.grad for p in self.parameters() if p.grad is not None])
            # fused AdamW divides the gradients by grad_scale as it reads them: clipping without a pass of its own
            optimizer.grad_scale = torch.clamp((norm + 1e-6) / max_norm, min=1.0)
        else:
            norm = torch.nn.utils.clip_grad_norm_(self.parameters(), max_norm, foreach=True)
        bad = (~torch.isfinite(norm)).float()  # 0-d: 1.0 for a step to skip
        self._nonfinite.add_(bad)  # (total, in a row)
        self._nonfinite[1].mul_(bad)
        self._log_train_step(norm)
        if str(self.trainer.precision) != "16-mixed":  # under fp16 the GradScaler skips such steps itself
            self._skip_update_if(bad, optimizer)

    def _skip_update_if(self, bad: torch.Tensor, optimizer) -> None:
        """A non-finite loss or gradient must not reach the weights: fused AdamW and Muon + AdamW skip the
        update on the device (found_inf, as under a GradScaler: no host sync); others are asked on the host."""
        if skips_on_device(optimizer):
            optimizer.found_inf = bad  # 0-d, as a GradScaler passes it
        elif bad.item():
            self._check_nonfinite_streak(*self._nonfinite.tolist(), self.global_step)
            raise SkippedStep

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        try:
            optimizer.step(closure=optimizer_closure)
        except SkippedStep:
            pass  # the gradients are zeroed before the next step, the schedule moves on
        if self.weight_copies is not None:
            self.weight_copies.refresh()

    def _check_nonfinite_streak(self, total: float, streak: float, step: int) -> None:
        total, streak, limit = int(total), int(streak), self.hparams.max_nonfinite_steps
        if streak >= limit:
            raise UserError(
                f"{streak} optimizer steps in a row (up to step {step}) had a non-finite loss or "
                f"gradient and were skipped ({total} in all; the limit is trainer.max_nonfinite_steps={limit}); "
                "the weights are those of the last finite step and the checkpoints are kept: resume from one with a "
                "lower optim.max_lr, more warmup, or precision=bf16"
            )

    def _log_train_step(self, grad_norm: torch.Tensor) -> None:
        """train/loss (the mean over this step's micro-batches), train/grad_norm and the count of skipped
        non-finite steps, every log_every_n_steps, at x = updates made before this step (as the validation
        metrics). On a GPU they are copied to the host without waiting and written one interval later, when
        the copy is long done: the device is never synchronised for them."""
        step = self.global_step
        if step % self.trainer.log_every_n_steps == 0:
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
        loss = self.loss_fn(x, y)
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
            else:
                metrics.update({"train/eval_loss": loss, "train/eval_bpc": bpc})
        # For checkpointing and callbacks; the loggers get the values at x = optimizer steps taken,
        # the weights they were measured with (train/loss at step s was measured before update s + 1).
        self.log_dict(metrics, on_step=False, on_epoch=True, logger=False)
        values = {name: float(value) for name, value in metrics.items()}
        for logger in self.loggers:
            logger.log_metrics(values, step=self.global_step)

    # --- optimizer and schedule -----------------------------------------------------------------
    def optimizer_and_schedule(self, device_type: str, precision: str):
        """AdamW (or Muon + AdamW), fused where the device and precision allow, and its warmup + cosine LambdaLR."""
        config = self.optim_config
        fused = config.fused
        if fused is None:
            fused = device_type == "cuda" and precision in FUSED_PRECISIONS
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

    # --- checkpoints: the RNG streams, so that a resumed run draws what the uninterrupted one would --
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["rng_state"] = capture_rng_state()
        self._write_train_metrics()
        for logger in self.loggers:  # flushed: a run killed after this checkpoint keeps the points logged before it
            logger.save()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._check_same_model(checkpoint.get("hyper_parameters", {}))
        self._rng_to_restore = checkpoint.get("rng_state")

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
            path = self.trainer.ckpt_path if self._trainer is not None else "the checkpoint"
            raise UserError(
                f"checkpoint {path} does not match the config: it has {', '.join(differences)}; resume with the "
                "config it was trained with (its run's .hydra/config.yaml) or start a new run"
            )


def grads_in_place(module: LanguageModel, accumulate: int) -> bool:
    """Under CUDA graphs, accumulating micro-batches needs gradient buffers of our own, added to in place: a
    gradient set from None would be the graph's output buffer, which the next micro-batch overwrites. Without
    accumulation the graph's buffers are used as they are (no copy, no zeroing). Allocates them if needed."""
    if not (module._cudagraphs and accumulate > 1):
        return False
    for p in module.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    return True


class _Loss(torch.nn.Module):
    """The training loss as a module of the GPT's parameters: what make_graphed_callables captures."""

    def __init__(self, model: GPT, loss_fn):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(x, y)


def _call_with(module: torch.nn.Module, tensors: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.func.functional_call(module, tensors, (x, y))


def copy_to_host_async(values: torch.Tensor) -> tuple[torch.Tensor, torch.cuda.Event | None]:
    """A copy of `values` on the host, without waiting for the device: read it after event.synchronize()."""
    if not values.is_cuda:
        return values, None
    host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
    host.copy_(values, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()
    return host, copied


def capture_rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": [np.asarray(x).tolist() if isinstance(x, np.ndarray) else x for x in np.random.get_state()],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate(_as_tuple(state["python"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value):
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value
