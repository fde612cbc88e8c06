"""Builds the run's objects from the composed config: data module, LightningModule, callbacks, Trainer."""

from __future__ import annotations

import logging
import os
import warnings
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from . import fast
from .checkpointing import AtomicCheckpointIO
from .config import to_container, training_block_size, trains_on_gpu, world_size
from .data.datamodule import WindowDataModule
from .errors import UserError, one_line
from .lightning_patches import skip_the_per_batch_sigterm_broadcast
from .model import GPT
from .module import ARCHITECTURE, LanguageModel, gpt_config

# Batches are sliced on the device by the dataset itself: loader workers would only add copies.
warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
warnings.filterwarnings("ignore", message=r".*Your `IterableDataset` has `__len__` defined.*")
warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")
# Lightning's resume warning: the data position needs no state (ResumeCheckpoints says so instead).
warnings.filterwarnings("ignore", message=r".*your dataloader is not resumable.*")
# Its tip to install litlogger and the line that max_steps was reached (which the run's end says anyway).
logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
    lambda record: "💡 Tip" not in record.getMessage() and "`Trainer.fit` stopped" not in record.getMessage()
)


@contextmanager
def user_facing_instantiation(what: str):
    try:
        yield
    except InstantiationException as err:
        raise UserError(f"could not build {what}: {one_line(err.__cause__ or err)}") from err


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


def build_datamodule(cfg: DictConfig) -> WindowDataModule:
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
    """The model group, its vocabulary from the tokenizer unless set."""
    arguments = to_container(cfg.model)
    if arguments["vocab_size"] is not None and arguments["vocab_size"] < vocab_size:
        raise UserError(
            f"model.vocab_size={arguments['vocab_size']} is below the tokenizer's {vocab_size} ids; "
            "remove the override or raise it"
        )
    arguments["vocab_size"] = arguments["vocab_size"] or vocab_size
    return arguments


def build_module(cfg: DictConfig, datamodule: WindowDataModule) -> LanguageModel:
    tokenizer = datamodule.tokenizer
    model = model_arguments(cfg, tokenizer.vocab_size)
    check_training_fits(model, cfg.trainer.batch_size, training_block_size(cfg), trains_on_gpu(cfg))
    return LanguageModel(
        model=model,
        optim=to_container(cfg.optim),
        max_steps=cfg.trainer.max_steps,
        tokenizer_state=tokenizer.state(),
        chars_per_token={split: datamodule.chars_per_token(split) for split in ("val", "train")},
        bytes_per_token={split: datamodule.bytes_per_token(split) for split in ("val", "train")},
        max_nonfinite_steps=cfg.trainer.max_nonfinite_steps,
        tokenizer=tokenizer,
    )


TRAINING_BYTES_PER_PARAMETER = 16  # fp32 weights and gradients, AdamW's two moments
# A micro-batch's least: its int64 windows (T+1 ids a row) and one residual stream in bf16, whatever fast= fuses.
WINDOW_BYTES_PER_ID, RESIDUAL_BYTES_PER_VALUE = 8, 2


def memory_of(on_gpu: bool) -> tuple[str, int]:
    if on_gpu:
        return "the GPU", torch.cuda.get_device_properties(0).total_memory
    return "this machine", os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_training_fits(model: dict, batch_size: int, block_size: int, on_gpu: bool) -> None:
    """A model whose weights, gradients and optimizer state, or a micro-batch whose windows and one residual
    stream, alone exceed the device's memory is refused before it is allocated (the allocation fails with a
    traceback, or, where the system overcommits, the OOM killer ends the process after a long stall)."""
    with torch.device("meta"):  # shapes only: nothing allocated
        parameters = sum(p.numel() for p in GPT(gpt_config(model)).parameters())
    device, memory = memory_of(on_gpu)
    needed = parameters * TRAINING_BYTES_PER_PARAMETER
    if needed > memory:
        sizes = ", ".join(f"model.{key}={model[key]}" for key in ("vocab_size", "n_embd", "n_layer", "block_size"))
        raise UserError(
            f"the model ({sizes}) has {parameters / 1e6:,.0f} M parameters, whose training state needs "
            f"{needed / 2**30:,.0f} GiB and {device} has {memory / 2**30:,.0f} GiB; make the model smaller"
        )
    per_row = (block_size + 1) * WINDOW_BYTES_PER_ID + block_size * model["n_embd"] * RESIDUAL_BYTES_PER_VALUE
    if batch_size * per_row > memory:
        raise UserError(
            f"trainer.batch_size={batch_size} windows of {block_size} tokens need at least "
            f"{batch_size * per_row / 2**30:,.0f} GiB for one micro-batch and {device} has {memory / 2**30:,.0f} GiB: "
            "lower trainer.batch_size (raise trainer.accumulate_grad_batches to keep the tokens per step)"
        )


def out_of_memory(err: BaseException) -> bool:
    """An allocation that failed: torch's OutOfMemoryError (a GPU), its CPU allocator's error, or Python's."""
    return isinstance(err, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in str(err)


def take_pretrained_shape(cfg: DictConfig, command_line: set[str]) -> None:
    """model.init_from: the model's shape becomes the weights' (model.dropout stays the config's); a shape key the
    command line set to another value than the weights' is an error, not silently replaced."""
    from .hf import read_pretrained

    weights = asdict(read_pretrained(cfg.model.init_from, *tokenizer_files(cfg)).config)
    conflicts = [
        f"model.{key}={cfg.model[key]} (the weights': {weights[key]})"
        for key in ARCHITECTURE
        if f"model.{key}" in command_line and cfg.model[key] != weights[key]
    ]
    if conflicts:
        raise UserError(
            f"model.init_from={cfg.model.init_from} takes the model's shape from its weights, and the command line "
            f"sets {', '.join(conflicts)}; remove the override (a shorter training window: data.block_size)"
        )
    for key in ARCHITECTURE:
        cfg.model[key] = weights[key]


def load_pretrained_weights(cfg: DictConfig, module: LanguageModel) -> None:
    """model.init_from's weights into the built model, once its tokenizer is found to be theirs."""
    from .hf import read_pretrained

    pretrained = read_pretrained(cfg.model.init_from, *tokenizer_files(cfg))
    theirs, ours = pretrained.tokenizer, module.tokenizer
    if theirs.state() != ours.state():
        raise UserError(
            f"model.init_from={cfg.model.init_from} was trained with a {theirs.kind} tokenizer of {theirs.vocab_size} "
            f"ids, this run's is {ours.kind} with {ours.vocab_size}: fine-tune with the tokenizer of the weights "
            f"(tokenizer={theirs.kind}{', the same file or corpus' if theirs.kind != 'gpt2' else ''})"
        )
    module.model.load_state_dict(pretrained.state_dict())


def tokenizer_files(cfg: DictConfig) -> tuple[str, str | None]:
    """The cache and mirror GPT-2's tokenizer files come from (the data group's)."""
    cache = OmegaConf.select(cfg, "data.cache_dir", default=None) or os.environ.get("LMTRAIN_CACHE", "~/.cache/lmtrain")
    return cache, OmegaConf.select(cfg, "data.mirror", default=None)


def apply_fast(cfg: DictConfig, module: LanguageModel) -> list:
    """The fast group's pieces swapped into the module; the callbacks that train them."""
    return fast.apply(module, cfg.fast, cfg.trainer.precision)


def build_callbacks(cfg: DictConfig) -> list:
    callbacks = []
    for name, callback in cfg.callbacks.items():
        if callback is not None:
            with user_facing_instantiation(f"callbacks.{name}"):
                callbacks.append(instantiate(callback))
    return callbacks


def build_logger(cfg: DictConfig):
    """The logger group's Lightning logger; W&B and MLflow are an optional extra, named when missing."""
    import sys

    from lightning.pytorch.loggers import WandbLogger  # importable without wandb

    if cfg.logger is None:
        return False
    with user_facing_instantiation("the logger"):
        try:
            logger = instantiate(cfg.logger)
        except InstantiationException as err:
            if not isinstance(err.__cause__, ImportError):  # Lightning's ModuleNotFoundError for wandb or mlflow
                raise
            missing = one_line(err.__cause__).split(" HINT:")[0]
            raise UserError(
                f"logger {cfg.logger._target_} needs a package that is not installed ({missing}): "
                "pip install -e '.[loggers]'"
            ) from err
    wandb = sys.modules.get("wandb")
    if isinstance(logger, WandbLogger) and wandb is not None and wandb.run is not None:
        wandb.finish()  # an earlier job of a sweep in this process: Lightning would log this job into its run
    return logger


def build_strategy(cfg: DictConfig):
    """A strategy name ("auto", "ddp", "fsdp", ...) or one built from its `_target_` with its options."""
    strategy = cfg.trainer.strategy
    if isinstance(strategy, DictConfig):
        with user_facing_instantiation("trainer.strategy"):
            return instantiate(strategy)
    return strategy


def build_trainer(cfg: DictConfig, callbacks: list, logger) -> L.Trainer:
    t = cfg.trainer
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
        enable_model_summary=False,  # the callbacks' ModelSize says what matters here
        logger=logger,
        plugins=[AtomicCheckpointIO()],
        default_root_dir=cfg.output_dir,
    )
    skip_the_per_batch_sigterm_broadcast(trainer)
    return trainer


def log_config(logger, cfg: DictConfig) -> None:
    """The resolved config as the logger's hyperparameters (TensorBoard's HPARAMS row waits for the results:
    lmtrain.loggers)."""
    if not logger:
        return
    flat = {k: v for k, v in _flatten(to_container(cfg)).items() if not k.startswith("callbacks.")}
    logger.log_hyperparams(flat)


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
