"""Structured configs: one typed dataclass per concern, registered with Hydra's ConfigStore.

The YAML files in conf/ fill these schemas, so an unknown key or a wrong type fails at composition.
`validate` then checks what types cannot (ranges, relations) and reports every problem at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from .errors import UserError
from .model import GPTConfig
from .optim import OptimConfig

PRECISIONS = {"bf16-mixed", "16-mixed", "32-true", "bf16-true"}
AUTOCAST_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}  # the precisions that autocast
SINGLE_PROCESS_OPTIONS = {  # model options that train one process only, and why
    "cast_weights_once": "DDP and FSDP synchronise the weights' own gradients, not the copies'",
    "cuda_graphs": "DDP and FSDP hook into each backward",
}


@dataclass
class ModelConfig(GPTConfig):
    vocab_size: int | None = None  # None: the tokenizer's; if set, at least the tokenizer's
    compile: bool = False  # torch.compile the training loss (model forward + cross-entropy)
    compile_mode: str | None = None  # None (default), "reduce-overhead" (CUDA graphs), "max-autotune"
    compile_scope: str = "model"  # "model": forward + loss as one graph; "blocks": one graph all blocks share
    loss_chunk_rows: int = 0  # > 0: the head's cross-entropy a slice of rows at a time (saves the logits' memory)
    fused_loss: bool = False  # the head's cross-entropy and its gradient in one Triton kernel (CUDA)
    cast_weights_once: bool = False  # matmul weights cast to the autocast dtype once per optimizer step
    cuda_graphs: bool = False  # uncompiled training forward and backward replayed as CUDA graphs (CUDA)


@dataclass
class DataConfig:
    _target_: str = "lmtrain.data.datamodule.TextDataModule"
    name: str = "shakespeare"  # a known download (shakespeare) or a label for `path`
    path: str | None = None  # a UTF-8 file or a folder of .txt files
    mirror: str | None = "${oc.env:LMTRAIN_DATA_MIRROR,null}"  # a folder to copy downloads from
    cache_dir: str = "${oc.env:LMTRAIN_CACHE,'~/.cache/lmtrain'}"
    val_fraction: float = 0.1
    block_size: int | None = None  # training window; None: the model's block_size


@dataclass
class TokenizerConfig:
    _target_: str = MISSING
    _partial_: bool = True


@dataclass
class GPT2TokenizerConfig(TokenizerConfig):
    _target_: str = "lmtrain.tokenizer.gpt2.build"


@dataclass
class CharTokenizerConfig(TokenizerConfig):
    _target_: str = "lmtrain.tokenizer.char.build"


@dataclass
class BPETokenizerConfig(TokenizerConfig):
    _target_: str = "lmtrain.tokenizer.bpe_train.build"
    vocab_size: int = 4096  # byte tokens + merges + special tokens
    pattern: str = "gpt2"  # pre-tokenization: gpt2, gpt4 or none
    special_tokens: list[str] = field(default_factory=list)
    path: str | None = None  # a saved tokenizer file instead of training one


@dataclass
class SentencePieceTokenizerConfig(TokenizerConfig):
    _target_: str = "lmtrain.tokenizer.spm.build"
    vocab_size: int = 4096
    model_type: str = "bpe"  # bpe or unigram


@dataclass
class TrainerConfig:
    accelerator: str = "auto"
    devices: Any = "auto"
    num_nodes: int = 1
    strategy: Any = "auto"
    precision: str = "bf16-mixed"  # set by the precision group
    max_steps: int = 5000  # optimizer steps
    batch_size: int = 64  # micro-batch per device
    accumulate_grad_batches: int = 4
    tokens_per_step: int | None = None  # set: accumulate_grad_batches = this / (batch x block x world size)
    gradient_clip_val: float | None = 1.0
    eval_interval: int = 250  # optimizer steps between evaluations
    eval_batches: int | None = 20  # None: one fixed full pass over each split
    eval_train: bool = True  # evaluate the training split too (train/eval_loss: the overfitting gap)
    eval_at_start: bool = True  # evaluate (and sample) before the first step
    log_every_n_steps: int = 50
    max_nonfinite_steps: int = 10  # stop after this many steps in a row with a non-finite loss or gradient
    matmul_precision: str = "high"  # "high": TF32 matmuls on Ampere and newer


@dataclass
class CheckpointConfig:
    every_n_steps: int = 1000  # periodic full checkpoint (model, optimizer, RNG) for resuming
    keep_last: int = 2


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: Any = MISSING
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    callbacks: dict[str, Any] = field(default_factory=dict)
    logger: Any = None
    name: str = "default"
    seed: int = 1337
    ckpt_path: str | None = None  # a checkpoint file, or "last": the newest in this run folder
    output_dir: str = "${hydra:runtime.output_dir}"


@dataclass
class SampleConfig:
    """`python -m lmtrain.sample`: prompts x temperatures from a checkpoint, the lesson's generate_samples."""

    ckpt_path: str = MISSING
    prompts: list[str] = field(
        default_factory=lambda: ["ROMEO:\nO, ", "JULIET:\nMy ", "Enter HAMLET\n\nHAMLET:\n", "KING:\nWe shall "]
    )
    temperatures: list[float] = field(default_factory=lambda: [0.5, 0.8, 1.2])
    top_k: int | None = 40
    top_p: float | None = None
    max_new_tokens: int = 150
    num_samples: int = 1
    seed: int = 1337
    use_cache: bool = True
    device: str = "auto"  # auto: cuda when present, else cpu
    mirror: str | None = "${oc.env:LMTRAIN_DATA_MIRROR,null}"  # for GPT-2's tokenizer files
    cache_dir: str = "${oc.env:LMTRAIN_CACHE,'~/.cache/lmtrain'}"


@dataclass
class ScheduleConfig:
    """`python -m lmtrain.schedule`: the configured warmup + cosine schedule, drawn and checked."""

    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    out: str = "lr_schedule.png"


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="sample_schema", node=SampleConfig)
    cs.store(name="schedule_schema", node=ScheduleConfig)
    cs.store(group="schema/tokenizer", name="gpt2", node=GPT2TokenizerConfig)
    cs.store(group="schema/tokenizer", name="char", node=CharTokenizerConfig)
    cs.store(group="schema/tokenizer", name="bpe", node=BPETokenizerConfig)
    cs.store(group="schema/tokenizer", name="sentencepiece", node=SentencePieceTokenizerConfig)


register_configs()


def _on_gpu(gpu_value, cpu_value):
    """`${lmtrain.on_gpu:a,b}`: a where CUDA is available, else b (presets chosen as `make train` chooses)."""
    import torch

    return gpu_value if torch.cuda.is_available() else cpu_value


if not OmegaConf.has_resolver("lmtrain.on_gpu"):
    OmegaConf.register_new_resolver("lmtrain.on_gpu", _on_gpu)
if not OmegaConf.has_resolver("lmtrain.times"):  # `${lmtrain.times:${optim.max_lr},0.1}`: a product
    OmegaConf.register_new_resolver("lmtrain.times", lambda a, b: float(a) * float(b))


def training_block_size(cfg: DictConfig | TrainConfig) -> int:
    return cfg.data.block_size or cfg.model.block_size


def validate(cfg: DictConfig) -> None:
    """Every problem types cannot catch, in one UserError: `key=value …; fix`."""
    m, o, t, d, c = cfg.model, cfg.optim, cfg.trainer, cfg.data, cfg.checkpoint
    problems = []

    def need(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)

    for key in ("n_layer", "n_head", "n_embd", "block_size"):
        need(m[key] >= 1, f"model.{key}={m[key]} must be at least 1")
    if m.n_head >= 1 and m.n_embd >= 1:  # (below 1: named just above)
        need(
            m.n_embd % m.n_head == 0,
            f"model.n_embd={m.n_embd} is not divisible by model.n_head={m.n_head}; "
            f"choose an n_head that divides it, e.g. {_divisor_near(m.n_embd, m.n_head)}",
        )
    need(0.0 <= m.dropout < 1.0, f"model.dropout={m.dropout} must be in [0, 1)")
    need(m.mlp in ("gelu", "gelu_tanh", "relu2"), f"model.mlp={m.mlp!r} must be gelu, gelu_tanh or relu2")
    need(m.norm in ("layernorm", "rms"), f"model.norm={m.norm!r} must be layernorm or rms")
    need(
        not m.rope or (m.n_head >= 1 and (m.n_embd // m.n_head) % 2 == 0),
        "model.rope needs an even head size (n_embd / n_head)",
    )
    need(m.vocab_multiple >= 1, f"model.vocab_multiple={m.vocab_multiple} must be at least 1")
    need(m.loss_chunk_rows >= 0, f"model.loss_chunk_rows={m.loss_chunk_rows} must be 0 (off) or positive")
    need(
        not (m.fused_loss and m.loss_chunk_rows),
        "model.fused_loss and model.loss_chunk_rows are two ways to compute the loss: turn one of them off",
    )
    need(
        not (m.fused_loss and t.precision == "16-mixed"),
        "model.fused_loss writes the loss's gradient in fp16 before the GradScaler scales it (small ones would "
        "underflow to 0): use precision=bf16 or model.fused_loss=false",
    )
    need(
        m.compile_mode in (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
        f"model.compile_mode={m.compile_mode!r} must be null, default, reduce-overhead or max-autotune",
    )
    need(m.compile_scope in ("model", "blocks"), f"model.compile_scope={m.compile_scope!r} must be model or blocks")
    need(
        not m.cast_weights_once or t.precision in AUTOCAST_DTYPES,
        f"model.cast_weights_once casts for autocast, which precision={t.precision} does not use: "
        "use precision=bf16 or fp16, or model.cast_weights_once=false",
    )
    need(
        not (m.cuda_graphs and (m.compile or m.cast_weights_once)),
        "model.cuda_graphs captures the uncompiled model and its own weights: turn it off for model.compile "
        "(model.compile_mode=reduce-overhead graphs the compiled one) and for model.cast_weights_once",
    )
    distributed = any(s in str(t.strategy).lower() for s in ("ddp", "fsdp"))
    for key, reason in SINGLE_PROCESS_OPTIONS.items():
        need(not (m[key] and distributed), f"model.{key} trains one process: {reason} (use model.{key}=false)")
    need(
        not (m.compile and m.compile_scope == "blocks" and "fsdp" in str(t.strategy).lower()),
        "model.compile_scope=blocks compiles the blocks before FSDP wraps them: use model.compile_scope=model",
    )
    need(
        d.block_size is None or 1 <= d.block_size <= m.block_size,
        f"data.block_size={d.block_size} is above the model's context model.block_size={m.block_size}; "
        "lower data.block_size or raise model.block_size",
    )
    need(0.0 < d.val_fraction < 1.0, f"data.val_fraction={d.val_fraction} must be between 0 and 1")
    tok = cfg.tokenizer
    if "pattern" in tok:
        need(tok.pattern in ("gpt2", "gpt4", "none"), f"tokenizer.pattern={tok.pattern!r} must be gpt2, gpt4 or none")
    if "vocab_size" in tok:
        need(tok.vocab_size >= 257, f"tokenizer.vocab_size={tok.vocab_size} must be at least 257 (256 bytes + 1)")

    problems += schedule_problems(o, t.max_steps)
    need(
        len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas),
        f"optim.betas={list(o.betas)} must be two values in [0, 1)",
    )
    need(o.weight_decay >= 0, f"optim.weight_decay={o.weight_decay} must not be negative")
    need(
        not (o.fused and t.precision == "16-mixed"),
        "optim.fused=true cannot run under precision=fp16: lmtrain clips inside fused AdamW's step, on gradients "
        "the GradScaler has not unscaled yet; use optim.fused=null (foreach AdamW) or precision=bf16",
    )

    positive = (
        "max_steps",
        "batch_size",
        "accumulate_grad_batches",
        "eval_interval",
        "log_every_n_steps",
        "num_nodes",
        "max_nonfinite_steps",
    )
    for key in positive:
        need(t[key] >= 1, f"trainer.{key}={t[key]} must be at least 1")
    need(
        t.eval_batches is None or t.eval_batches >= 1,
        f"trainer.eval_batches={t.eval_batches} must be at least 1 (or null for a full pass)",
    )
    need(
        t.gradient_clip_val is None or t.gradient_clip_val > 0,
        f"trainer.gradient_clip_val={t.gradient_clip_val} must be positive (or null for no clipping)",
    )
    need(
        t.precision in PRECISIONS,
        f"trainer.precision={t.precision!r} must be one of {sorted(PRECISIONS)}; use precision=bf16|fp16|fp32",
    )
    need(
        t.matmul_precision in ("highest", "high", "medium"),
        f"trainer.matmul_precision={t.matmul_precision!r} must be highest, high or medium",
    )
    need(c.every_n_steps >= 1, f"checkpoint.every_n_steps={c.every_n_steps} must be at least 1")
    need(c.keep_last >= 1, f"checkpoint.keep_last={c.keep_last} must be at least 1")
    if problems:
        raise UserError("; ".join(problems))


def schedule_problems(o, max_steps: int) -> list[str]:
    """The optimizer settings the schedule depends on (shared by training and `lmtrain.schedule`)."""
    checks = [
        (o.name in ("adamw", "muon"), f"optim.name={o.name!r} must be adamw or muon"),
        (o.max_lr > 0, f"optim.max_lr={o.max_lr} must be positive"),
        (0 <= o.min_lr <= o.max_lr, f"optim.min_lr={o.min_lr} must be between 0 and optim.max_lr={o.max_lr}"),
        (
            0 <= o.warmup_steps <= max_steps,
            f"optim.warmup_steps={o.warmup_steps} exceeds trainer.max_steps={max_steps}; "
            "lower the warmup or train longer",
        ),
    ]
    return [message for ok, message in checks if not ok]


def validate_schedule(cfg: DictConfig) -> None:
    problems = schedule_problems(cfg.optim, cfg.trainer.max_steps)
    if problems:
        raise UserError("; ".join(problems))


def _divisor_near(n: int, k: int) -> int:
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: abs(d - k))


def to_container(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
