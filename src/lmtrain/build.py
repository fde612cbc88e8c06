"""Builds the run's objects from the composed config: data module, LightningModule, callbacks, Trainer."""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import warnings
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from .checkpointing import AtomicCheckpointIO
from .config import to_container, training_block_size
from .data.datamodule import TextDataModule
from .errors import UserError, one_line
from .lightning_patches import skip_the_per_batch_sigterm_broadcast
from .model import GPTConfig
from .module import LanguageModel

# Batches are sliced on the device by the dataset itself: loader workers would only add copies.
warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
warnings.filterwarnings("ignore", message=r".*Your `IterableDataset` has `__len__` defined.*")
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")
logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(lambda record: "💡 Tip" not in record.getMessage())


@contextmanager
def user_facing_instantiation(what: str):
    try:
        yield
    except InstantiationException as err:
        raise UserError(f"could not build {what}: {one_line(err.__cause__ or err)}") from err


def world_size(cfg: DictConfig) -> int:
    """Processes that will train: devices per node x nodes (auto: every GPU, or one CPU process)."""
    devices, accelerator = cfg.trainer.devices, cfg.trainer.accelerator
    if isinstance(devices, int):
        count = devices
    elif isinstance(devices, str) and devices.lstrip("-").isdigit():
        count = int(devices)
    elif not isinstance(devices, str):
        count = len(devices)
    else:
        count = 1
    if count == -1 or devices == "auto":
        count = torch.cuda.device_count() if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available() else 1
    return max(count, 1) * cfg.trainer.num_nodes


def accumulation(cfg: DictConfig) -> int:
    """accumulate_grad_batches, or derived from tokens_per_step so that any world size takes the same steps."""
    t = cfg.trainer
    if t.tokens_per_step is None:
        return t.accumulate_grad_batches
    per_micro_batch = t.batch_size * training_block_size(cfg) * world_size(cfg)
    if t.tokens_per_step % per_micro_batch:
        raise UserError(
            f"trainer.tokens_per_step={t.tokens_per_step} is not a multiple of batch_size x block x world size = "
            f"{t.batch_size} x {training_block_size(cfg)} x {world_size(cfg)} = {per_micro_batch}; "
            "change trainer.batch_size or trainer.tokens_per_step"
        )
    return t.tokens_per_step // per_micro_batch


def tokens_per_step(cfg: DictConfig) -> int:
    return cfg.trainer.batch_size * training_block_size(cfg) * accumulation(cfg) * world_size(cfg)


def build_datamodule(cfg: DictConfig) -> TextDataModule:
    with user_facing_instantiation("the tokenizer"):
        make_tokenizer = instantiate(cfg.tokenizer)
    with user_facing_instantiation("the data module"):
        return instantiate(
            cfg.data,
            tokenizer=make_tokenizer,
            block_size=training_block_size(cfg),
            batch_size=cfg.trainer.batch_size,
            train_batches=cfg.trainer.max_steps * accumulation(cfg),
            eval_batches=cfg.trainer.eval_batches,
            eval_train=cfg.trainer.eval_train,
            seed=cfg.seed,
            _convert_="object",
        )


def model_arguments(cfg: DictConfig, vocab_size: int) -> dict:
    """The GPTConfig fields: the model group without its training switches, the vocabulary from the tokenizer."""
    architecture = {f.name for f in fields(GPTConfig)}
    arguments = {key: value for key, value in to_container(cfg.model).items() if key in architecture}
    if arguments["vocab_size"] is not None and arguments["vocab_size"] < vocab_size:
        raise UserError(
            f"model.vocab_size={arguments['vocab_size']} is below the tokenizer's {vocab_size} ids; "
            "remove the override or raise it"
        )
    arguments["vocab_size"] = arguments["vocab_size"] or vocab_size
    return arguments


def build_module(cfg: DictConfig, datamodule: TextDataModule) -> LanguageModel:
    corpus = datamodule.corpus
    return LanguageModel(
        model=model_arguments(cfg, corpus.tokenizer.vocab_size),
        optim=to_container(cfg.optim),
        max_steps=cfg.trainer.max_steps,
        tokenizer_state=corpus.tokenizer.state(),
        chars_per_token={split: corpus.chars_per_token(split) for split in ("val", "train")},
        compile=cfg.model.compile,
        compile_mode=cfg.model.compile_mode,
        compile_scope=cfg.model.compile_scope,
        loss_chunk_rows=cfg.model.loss_chunk_rows,
        fused_loss=cfg.model.fused_loss,
        cast_weights_once=cfg.model.cast_weights_once,
        cuda_graphs=cfg.model.cuda_graphs,
        max_nonfinite_steps=cfg.trainer.max_nonfinite_steps,
        tokenizer=corpus.tokenizer,
    )


def build_callbacks(cfg: DictConfig) -> list:
    callbacks = []
    for name, callback in cfg.callbacks.items():
        if callback is not None:
            with user_facing_instantiation(f"callbacks.{name}"):
                callbacks.append(instantiate(callback))
    return callbacks


def build_logger(cfg: DictConfig):
    if cfg.logger is None:
        return False
    with user_facing_instantiation("the logger"):
        return instantiate(cfg.logger)


def check_device_options(cfg: DictConfig) -> None:
    """Options that need a GPU (or the Triton interpreter, for the fused loss) fail before anything starts."""
    precision, accelerator = cfg.trainer.precision, cfg.trainer.accelerator
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if precision.startswith("bf16") and not (on_gpu and torch.cuda.is_bf16_supported()):
        raise UserError(
            "precision=bf16 needs a GPU with bfloat16 (Ampere or newer) and there is none here; use precision=fp32"
        )
    if precision == "16-mixed" and not on_gpu:
        raise UserError("precision=fp16 needs a CUDA GPU; use precision=fp32 on the CPU")
    if cfg.model.cuda_graphs and not (on_gpu and torch.cuda.is_available()):
        raise UserError("model.cuda_graphs=true replays CUDA graphs: it needs a CUDA GPU; set model.cuda_graphs=false")
    triton_runs = on_gpu or os.environ.get("TRITON_INTERPRET") == "1"
    if cfg.model.fused_loss and not (triton_runs and importlib.util.find_spec("triton")):
        raise UserError(
            "model.fused_loss=true runs a Triton kernel: it needs a CUDA GPU and the triton package; "
            "set model.fused_loss=false"
        )


def build_strategy(cfg: DictConfig):
    """A strategy name ("auto", "ddp", "fsdp", ...) or one built from its `_target_` with its options."""
    strategy = cfg.trainer.strategy
    if isinstance(strategy, DictConfig):
        with user_facing_instantiation("trainer.strategy"):
            return instantiate(strategy)
    return strategy


def build_trainer(cfg: DictConfig, callbacks: list, logger) -> L.Trainer:
    t = cfg.trainer
    check_device_options(cfg)
    torch.set_float32_matmul_precision(t.matmul_precision)
    accumulate = accumulation(cfg)
    trainer = L.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        num_nodes=t.num_nodes,
        strategy=build_strategy(cfg),
        precision=t.precision,
        max_steps=t.max_steps,
        accumulate_grad_batches=accumulate,
        gradient_clip_val=t.gradient_clip_val,
        val_check_interval=t.eval_interval * accumulate,  # counted in batches, not optimizer steps
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        log_every_n_steps=t.log_every_n_steps,
        callbacks=callbacks,
        logger=logger,
        plugins=[AtomicCheckpointIO()],
        default_root_dir=cfg.output_dir,
    )
    skip_the_per_batch_sigterm_broadcast(trainer)
    return trainer


def log_config(logger, cfg: DictConfig) -> None:
    """The resolved config as TensorBoard hparams, with val/loss_best registered for the HPARAMS tab."""
    if not logger:
        return
    flat = {k: v for k, v in _flatten(to_container(cfg)).items() if not k.startswith("callbacks.")}
    logger.log_hyperparams(flat, metrics={"val/loss_best": math.nan})


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = str(value) if isinstance(value, (list, tuple)) or value is None else value
    return flat


def output_dir(cfg: DictConfig) -> Path:
    return Path(OmegaConf.select(cfg, "output_dir"))
