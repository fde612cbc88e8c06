"""Train a GPT: `python -m lmtrain.train [experiment=seed] [group=option] [key=value ...]`.

Compose (Hydra) → validate → build (data, model, callbacks, Trainer) → fit (Lightning) → summary.json.
    python -m lmtrain.train experiment=smoke                # seconds on a CPU
    python -m lmtrain.train model=gpt10m precision=bf16     # the lesson's build-along on a GPU
    python -m lmtrain.train --cfg job experiment=seed       # print the composed config
    python -m lmtrain.train -m optim.warmup_steps=0,200     # a sweep, one run folder per job
"""

from __future__ import annotations

import os
from contextlib import nullcontext
from pathlib import Path

from omegaconf import DictConfig

from .cli import command, record_resolved_config
from .config import check_machine, training_block_size, validate
from .console import say
from .errors import UserError
from .fileio import run_folder_lock


def train(cfg: DictConfig) -> float:
    """One training run from a composed config; returns its best val/loss (what a sweeper minimises)."""
    from . import build  # here, not above: `--cfg job` and `--help` print without importing Lightning

    if cfg.model.init_from:
        build.take_pretrained_shape(cfg, command_line_keys())
        record_again(cfg)
    validate(cfg)
    check_machine(cfg)
    if cfg.ckpt_path == "last":
        cfg.output_dir = str(run_to_resume(cfg))
    with run_folder_lock(build.output_dir(cfg)) if launching_process() else nullcontext():
        return fit(cfg)


def fit(cfg: DictConfig) -> float:
    import lightning as L

    from . import build
    from .checkpointing import resolve_ckpt_path

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = build.build_datamodule(cfg)
    datamodule.prepare_data()
    module = build.build_module(cfg, datamodule)
    if cfg.model.init_from and cfg.ckpt_path is None:  # a resumed run's weights are its checkpoint's
        build.load_pretrained_weights(cfg, module)
    callbacks = build.build_callbacks(cfg) + build.apply_fast(cfg, module)
    logger = build.build_logger(cfg)
    trainer = build.build_trainer(cfg, callbacks, logger)
    ckpt_path = resolve_ckpt_path(cfg.ckpt_path, build.output_dir(cfg))
    build.log_config(logger, cfg)
    try:
        if ckpt_path is None and cfg.trainer.eval_at_start:
            trainer.validate(module, datamodule=datamodule, verbose=False)
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except (MemoryError, RuntimeError) as err:
        if not build.out_of_memory(err):
            raise
        t = cfg.trainer
        raise UserError(
            f"out of memory after step {trainer.global_step} with trainer.batch_size={t.batch_size} and "
            f"block size {training_block_size(cfg)}: lower trainer.batch_size (raise trainer.accumulate_grad_batches "
            "to keep the tokens per step) or the block size; the checkpoints written so far are kept"
        ) from err
    best = trainer.checkpoint_callback.best_model_score if trainer.checkpoint_callback else None
    return float(best) if best is not None else float(trainer.callback_metrics.get("val/loss", "nan"))


def command_line_keys() -> set[str]:
    """The keys the command line set (`model.n_layer=12`: model.n_layer), none outside Hydra's main."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if not HydraConfig.initialized():
        return set()
    overrides = OverridesParser.create().parse_overrides(list(HydraConfig.get().overrides.task))
    return {override.key_or_group for override in overrides}


def record_again(cfg: DictConfig) -> None:
    """The run's .hydra/config.yaml with the values filled in since Hydra wrote it (the pretrained shape)."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        record_resolved_config(cfg)


def launching_process() -> bool:
    """Not one of the processes DDP starts for the other ranks (torchrun, SLURM or Lightning's launcher), which
    write into the run folder of the first."""
    return all(os.environ.get(name, "0") == "0" for name in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


def run_to_resume(cfg: DictConfig) -> Path:
    """ckpt_path=last: the folder given by hydra.run.dir, else the newest run under outputs/ with this config."""
    from hydra.core.hydra_config import HydraConfig

    from .checkpointing import newest_matching_run

    hydra_cfg = HydraConfig.get()
    if any(o.startswith("hydra.run.dir=") for o in hydra_cfg.overrides.hydra):
        return Path(cfg.output_dir)
    found = newest_matching_run(cfg, Path(hydra_cfg.runtime.cwd) / "outputs")
    if found is None:
        raise UserError(
            "ckpt_path=last found no earlier run with this config under outputs/; give its folder with "
            "hydra.run.dir=<run> or a file with ckpt_path=<file>"
        )
    say(f"resuming {found}: the newest run with this config")
    return found


main = command(train, config_name="train")


if __name__ == "__main__":
    main()
