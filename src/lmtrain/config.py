"""Structured configs: one typed dataclass per concern, registered with Hydra's ConfigStore.

The YAML files in conf/ fill these schemas, so an unknown key or a wrong type fails at composition.
`validate` then checks what types cannot (ranges, relations) and reports every problem at once.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from .console import say
from .errors import UserError
from .model import GPTConfig
from .optim import OptimConfig
from .precision import PRECISIONS


def choice(default, *others):
    """A field that takes one of these values (checked by validate, listed in docs/options.md)."""
    return field(default=default, metadata={"choices": (default, *others)})


@dataclass
class ModelConfig(GPTConfig):
    """The architecture (the GPT's own GPTConfig): what a checkpoint's weights depend on."""

    vocab_size: int | None = None  # None: the tokenizer's; if set, at least the tokenizer's
    mlp: str = choice("gelu", "gelu_tanh", "relu2")
    norm: str = choice("layernorm", "rms")
    init_from: str | None = None  # pretrained weights (gpt2, gpt2-medium, gpt2-large, gpt2-xl, a folder): their shape

    def problems(self) -> list[str]:
        problems = [
            f"model.{key}={getattr(self, key)} must be at least 1" for key in LAYER_SIZES if getattr(self, key) < 1
        ]
        if self.n_head >= 1 and self.n_embd >= 1 and self.n_embd % self.n_head:
            problems.append(
                f"model.n_embd={self.n_embd} is not divisible by model.n_head={self.n_head}; "
                f"choose an n_head that divides it, e.g. {_divisor_near(self.n_embd, self.n_head)}"
            )
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"model.dropout={self.dropout} must be in [0, 1)")
        if self.rope and self.n_head >= 1 and (self.n_embd // self.n_head) % 2:
            problems.append("model.rope needs an even head size (n_embd / n_head)")
        if self.vocab_multiple < 1:
            problems.append(f"model.vocab_multiple={self.vocab_multiple} must be at least 1")
        return problems


LAYER_SIZES = ("n_layer", "n_head", "n_embd", "block_size")


@dataclass
class FastConfig:
    """The speed wing (lmtrain.fast): faster implementations of the same math; none changes the model trained."""

    compile: bool = False  # torch.compile the training loss (forward + cross-entropy), or the blocks
    compile_mode: str | None = choice(None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
    compile_scope: str = choice("model", "blocks")  # model: one graph of the loss; blocks: one graph all blocks share
    loss: str = choice(
        "plain", "chunked", "fused"
    )  # the head's cross-entropy: whole, a slice of rows at a time, Triton
    loss_chunk_rows: int = 4096  # loss=chunked: rows per slice
    fused_qk_norm_rope: bool = False  # QK-norm and rotary in one Triton kernel each way (GPU, not compiled)
    fused_mlp: bool = False  # ReLU² as one autograd function; GELU(tanh) in cuBLASLt's matmul epilogues (GPU)
    low_precision_residual: bool = False  # under autocast, the residual stream in the autocast dtype, not float32
    cast_weights_once: bool = False  # matmul weights cast to the autocast dtype once per optimizer step
    cuda_graphs: bool = False  # the uncompiled training forward and backward replayed as CUDA graphs
    decode_graphs: bool = False  # generation on a GPU: one CUDA-graph replay per token

    def problems(self) -> list[str]:
        problems = []
        if self.loss_chunk_rows < 1:
            problems.append(f"fast.loss_chunk_rows={self.loss_chunk_rows} must be at least 1")
        if self.cuda_graphs and (self.compile or self.cast_weights_once):
            problems.append(
                "fast.cuda_graphs captures the uncompiled model and its own weights: turn it off for fast.compile "
                "(fast.compile_mode=reduce-overhead graphs the compiled one) and for fast.cast_weights_once"
            )
        return problems


# The speed switches that lived under model.* before the fast group: where each went.
MOVED_TO_FAST = {
    "compile": "fast.compile",
    "compile_mode": "fast.compile_mode",
    "compile_scope": "fast.compile_scope",
    "fused_loss": "fast.loss=fused",
    "loss_chunk_rows": "fast.loss=chunked fast.loss_chunk_rows",
    "fused_qk_norm_rope": "fast.fused_qk_norm_rope",
    "gelu_in_matmul": "fast.fused_mlp",
    "low_precision_residual": "fast.low_precision_residual",
    "cast_weights_once": "fast.cast_weights_once",
    "cuda_graphs": "fast.cuda_graphs",
}
SINGLE_PROCESS_OPTIONS = {  # fast options that train one process only, and why
    "cast_weights_once": "DDP and FSDP synchronise the weights' own gradients, not the copies'",
    "cuda_graphs": "DDP and FSDP hook into each backward",
}


def moved_key_hint(full_key: str) -> str | None:
    """The one-line fix for an old model.* speed switch, or None for any other key."""
    group, _, key = full_key.partition(".")
    if group == "model" and key in MOVED_TO_FAST:
        return f"model.{key} moved to the fast group: use {MOVED_TO_FAST[key]} (docs/options.md)"
    return None


@dataclass
class DataConfig:
    _target_: str = "lmtrain.data.datamodule.TextDataModule"
    name: str = "shakespeare"  # a known download (shakespeare) or a label for `path`
    path: str | None = None  # a UTF-8 file or a folder of .txt files
    mirror: str | None = "${oc.env:LMTRAIN_DATA_MIRROR,null}"  # a folder to copy downloads from
    cache_dir: str = "${oc.env:LMTRAIN_CACHE,'~/.cache/lmtrain'}"
    val_fraction: float = 0.1
    block_size: int | None = None  # training window; None: the model's block_size

    def problems(self) -> list[str]:
        if not 0.0 < self.val_fraction < 1.0:
            return [f"data.val_fraction={self.val_fraction} must be between 0 and 1"]
        return []


@dataclass
class PreparedDataConfig(DataConfig):
    """data=prepared: the shards `python -m lmtrain.prepare` wrote, memory-mapped."""

    _target_: str = "lmtrain.data.datamodule.PreparedDataModule"
    name: str = "prepared"
    path: str | None = MISSING  # the folder lmtrain.prepare wrote (its manifest.json)
    on_device: Any = choice("auto", True, False)  # ids resident on the device; auto: where they fit
    verify: bool = True  # each shard's sha256 checked against the manifest (once per file version)


@dataclass
class TokenizerConfig:
    _target_: str = MISSING
    _partial_: bool = True


@dataclass
class TrainedTokenizerConfig(TokenizerConfig):
    vocab_size: int = 4096

    def problems(self) -> list[str]:
        if self.vocab_size < 257:
            return [f"tokenizer.vocab_size={self.vocab_size} must be at least 257 (256 bytes + 1)"]
        return []


@dataclass
class GPT2TokenizerConfig(TokenizerConfig):
    _target_: str = "lmtrain.tokenizer.gpt2.build"


@dataclass
class CharTokenizerConfig(TokenizerConfig):
    _target_: str = "lmtrain.tokenizer.char.build"


@dataclass
class BPETokenizerConfig(TrainedTokenizerConfig):
    _target_: str = "lmtrain.tokenizer.bpe_train.build"
    vocab_size: int = 4096  # byte tokens + merges + special tokens
    pattern: str = choice("gpt2", "gpt4", "none")  # pre-tokenization
    special_tokens: list[str] = field(default_factory=list)
    path: str | None = None  # a saved tokenizer file instead of training one


@dataclass
class SentencePieceTokenizerConfig(TrainedTokenizerConfig):
    _target_: str = "lmtrain.tokenizer.spm.build"
    model_type: str = choice("bpe", "unigram")


@dataclass
class TrainerConfig:
    accelerator: str = "auto"
    devices: Any = "auto"
    num_nodes: int = 1
    strategy: Any = "auto"
    precision: str = choice("auto", *PRECISIONS)  # set by the precision group; auto: bf16-mixed on a GPU with it
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
    matmul_precision: str = choice("high", "highest", "medium")  # high: TF32 matmuls on Ampere and newer

    def problems(self) -> list[str]:
        problems = [
            f"trainer.{key}={getattr(self, key)} must be at least 1" for key in POSITIVE if getattr(self, key) < 1
        ]
        if self.eval_batches is not None and self.eval_batches < 1:
            problems.append(f"trainer.eval_batches={self.eval_batches} must be at least 1 (or null for a full pass)")
        if isinstance(self.devices, int) and self.devices < 1 and self.devices != -1:
            problems.append(f"trainer.devices={self.devices} must be at least 1 (or -1 or auto: every device)")
        if self.gradient_clip_val is not None and self.gradient_clip_val <= 0:
            problems.append(
                f"trainer.gradient_clip_val={self.gradient_clip_val} must be positive (or null for no clipping)"
            )
        return problems


POSITIVE = ("max_steps", "batch_size", "accumulate_grad_batches", "eval_interval", "log_every_n_steps", "num_nodes")
POSITIVE += ("max_nonfinite_steps",)


@dataclass
class CheckpointConfig:
    every_n_steps: int = 1000  # periodic full checkpoint (model, optimizer, RNG) for resuming
    keep_last: int = 2

    def problems(self) -> list[str]:
        return [
            f"checkpoint.{key}={getattr(self, key)} must be at least 1"
            for key in ("every_n_steps", "keep_last")
            if getattr(self, key) < 1
        ]


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    fast: FastConfig = field(default_factory=FastConfig)
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


def sampling_problems(prefix: str, temperatures, top_k, top_p, max_new_tokens) -> list[str]:
    """Sampling settings that cannot draw: shared by `lmtrain.sample` and the samples written while training."""
    problems = [
        f"{prefix}temperature={t} must be 0 (greedy) or a positive finite number"
        for t in temperatures
        if not (math.isfinite(t) and t >= 0)
    ]
    if top_k is not None and top_k < 1:
        problems.append(f"{prefix}top_k={top_k} must be at least 1 (or null for all ids)")
    if top_p is not None and not 0 < top_p <= 1:
        problems.append(f"{prefix}top_p={top_p} must be in (0, 1] (or null for no nucleus)")
    if max_new_tokens is not None and max_new_tokens < 0:
        problems.append(f"{prefix}max_new_tokens={max_new_tokens} must not be negative")
    return problems


@dataclass
class SampleConfig:
    """`python -m lmtrain.sample`: prompts x temperatures from a checkpoint, the lesson's generate_samples."""

    ckpt_path: str | None = None  # a checkpoint lmtrain wrote, or:
    init_from: str | None = None  # pretrained weights: gpt2, gpt2-medium, gpt2-large, gpt2-xl or a transformers folder
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

    def problems(self) -> list[str]:
        problems = sampling_problems("", self.temperatures, self.top_k, self.top_p, self.max_new_tokens)
        if self.num_samples < 1:
            problems.append(f"num_samples={self.num_samples} must be at least 1")
        if not 0 <= self.seed < 2**32:
            problems.append(f"seed={self.seed} must be in [0, 2^32)")
        if self.ckpt_path is not None and self.init_from is not None:
            problems.append("ckpt_path and init_from both name a model; give one of them")
        return problems


@dataclass
class ExportConfig:
    """`python -m lmtrain.export`: a checkpoint as a folder transformers loads (GPT2LMHeadModel and its tokenizer)."""

    ckpt_path: str | None = None  # the checkpoint to export
    out: str | None = None  # the folder to write
    overwrite: bool = False  # replace `out` when it is not empty
    prompt: str = "ROMEO:\n"  # the model card's sample starts here
    max_new_tokens: int = 200  # the sample's length, in tokens
    seed: int = 1337
    mirror: str | None = "${oc.env:LMTRAIN_DATA_MIRROR,null}"  # GPT-2's tokenizer files
    cache_dir: str = "${oc.env:LMTRAIN_CACHE,'~/.cache/lmtrain'}"

    def problems(self) -> list[str]:
        problems = [f"{key} is missing; {fix}" for key, fix in EXPORT_NEEDS.items() if getattr(self, key) is None]
        problems += sampling_problems("", [], None, None, self.max_new_tokens)
        if not 0 <= self.seed < 2**32:
            problems.append(f"seed={self.seed} must be in [0, 2^32)")
        return problems


EXPORT_NEEDS = {
    "ckpt_path": "give the checkpoint to export: ckpt_path=<run>/checkpoints/best.ckpt",
    "out": "give the folder to write: out=<folder>",
}


@dataclass
class PrepareDataConfig:
    """`python -m lmtrain.prepare`'s input and how it is read and split."""

    path: str = MISSING  # a text/jsonl/parquet file, a folder of them (recursively), or hf:NAME
    workers: int | None = None  # processes; null: every core
    val_fraction: float = 0.1  # documents drawn by a hash of their position; one text file: its last characters
    text_field: str = "text"  # the jsonl field or parquet column holding the text
    errors: str = choice("strict", "replace")  # undecodable bytes: stop naming them, or read them as U+FFFD
    chunk_mb: int = 16  # input per task: the unit of work, of resume, and of a shard
    tokenizer_sample_mb: int = 64  # tokenizer=bpe/sentencepiece train on this much of the training documents
    hf_config: str | None = None  # data.path=hf:NAME: the dataset's configuration, split and data files
    hf_split: str = "train"
    hf_data_files: str | None = None
    mirror: str | None = "${oc.env:LMTRAIN_DATA_MIRROR,null}"  # for GPT-2's tokenizer files
    cache_dir: str = "${oc.env:LMTRAIN_CACHE,'~/.cache/lmtrain'}"

    def problems(self) -> list[str]:
        problems = []
        if not 0.0 < self.val_fraction < 1.0:
            problems.append(f"data.val_fraction={self.val_fraction} must be between 0 and 1")
        if self.workers is not None and self.workers < 1:
            problems.append(f"data.workers={self.workers} must be at least 1 (or null for every core)")
        for key in ("chunk_mb", "tokenizer_sample_mb"):
            if getattr(self, key) < 1:
                problems.append(f"data.{key}={getattr(self, key)} must be at least 1")
        return problems


@dataclass
class PrepareConfig:
    """`python -m lmtrain.prepare`: a corpus tokenized once into shards and a manifest."""

    data: PrepareDataConfig = field(default_factory=PrepareDataConfig)
    tokenizer: Any = MISSING
    out: str = MISSING  # a new or empty folder (or this command's unfinished one, to resume)
    progress: bool = True  # Rich progress on the terminal


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
    cs.store(name="prepare_schema", node=PrepareConfig)
    cs.store(name="prepared_data_schema", node=PreparedDataConfig)
    cs.store(name="export_schema", node=ExportConfig)
    cs.store(name="gpt2_tokenizer_schema", node=GPT2TokenizerConfig)
    cs.store(name="char_tokenizer_schema", node=CharTokenizerConfig)
    cs.store(name="bpe_tokenizer_schema", node=BPETokenizerConfig)
    cs.store(name="sentencepiece_tokenizer_schema", node=SentencePieceTokenizerConfig)


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


GROUPS = ("model", "fast", "data", "tokenizer", "trainer", "checkpoint")


def validate(cfg: DictConfig) -> None:
    """Every problem types cannot catch, in one UserError: `key=value …; fix`. Each group's schema checks its
    own fields; the rules between groups are in rules_between_groups. precision=auto is resolved first."""
    resolve_auto_precision(cfg)
    problems = unknown_key_problems(cfg)
    if problems:  # a schema cannot be built with keys it does not have
        raise UserError("; ".join(problems))
    for group in GROUPS:
        schema = OmegaConf.to_object(cfg[group])
        problems += choice_problems(schema, group)
        problems += schema.problems() if hasattr(schema, "problems") else []
    problems += optim_problems(cfg.optim) + schedule_problems(cfg.optim, cfg.trainer.max_steps)
    problems += rules_between_groups(cfg)
    for group in (*GROUPS, "optim", "callbacks"):  # the callbacks' paths name the run folder: left unresolved
        tree = OmegaConf.to_container(cfg[group], resolve=group != "callbacks")
        problems += nonfinite_problems(tree, f"{group}.")
    if not 0 <= cfg.seed < 2**32:
        problems.append(f"seed={cfg.seed} must be in [0, 2^32)")
    if problems:
        raise UserError("; ".join(problems))


def resolve_auto_precision(cfg: DictConfig) -> None:
    """precision=auto: bf16-mixed where the GPU has bfloat16, else 32-true (the fastest exact choice of a CPU)."""
    if OmegaConf.select(cfg, "trainer.precision") != "auto":
        return
    import torch

    cfg.trainer.precision = "bf16-mixed" if trains_on_gpu(cfg) and torch.cuda.is_bf16_supported() else "32-true"


def trains_on_gpu(cfg: DictConfig) -> bool:
    import torch

    accelerator = cfg.trainer.accelerator
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def unknown_key_problems(cfg: DictConfig, groups: tuple[str, ...] = (*GROUPS, "optim")) -> list[str]:
    """Keys the schemas do not have: Hydra's `+key=value` adds them past the schema (`+trainer.max_step=2`)."""
    problems = []
    for prefix, node in [("", cfg), *((f"{group}.", cfg[group]) for group in groups)]:
        schema = OmegaConf.get_type(node)
        if not is_dataclass(schema):
            continue
        known = {f.name for f in fields(schema)}
        for key in set(node.keys()) - known - {"hydra"}:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"did you mean {prefix}{close[0]}?" if close else "see the keys with --cfg job"
            problems.append(moved_key_hint(prefix + key) or f"{prefix}{key} is not a setting of lmtrain; {hint}")
    return sorted(problems)


def nonfinite_problems(tree: dict, prefix: str = "") -> list[str]:
    """Every number in a config group is finite: optim.max_lr=inf, say, would train all-NaN weights."""
    problems = []
    for key, value in tree.items():
        if isinstance(value, dict):
            problems += nonfinite_problems(value, f"{prefix}{key}.")
        elif isinstance(value, float) and not math.isfinite(value):
            problems.append(f"{prefix}{key}={value} must be a finite number")
    return problems


def choice_problems(schema, prefix: str) -> list[str]:
    """Fields declared with choice() holding another value."""
    if not is_dataclass(schema):
        return []
    problems = []
    for f in fields(schema):
        value, allowed = getattr(schema, f.name), f.metadata.get("choices")
        if allowed and value not in allowed:
            names = ", ".join("null" if a is None else str(a) for a in allowed)
            problems.append(f"{prefix}.{f.name}={value!r} must be one of {names}")
    return problems


def optim_problems(o) -> list[str]:
    problems = []
    if not (len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas)):
        problems.append(f"optim.betas={list(o.betas)} must be two values in [0, 1)")
    if o.weight_decay < 0:
        problems.append(f"optim.weight_decay={o.weight_decay} must not be negative")
    return problems


def rules_between_groups(cfg: DictConfig) -> list[str]:
    """What one group's setting requires of another's (the machine's devices: check_machine)."""
    m, f, t, d = cfg.model, cfg.fast, cfg.trainer, cfg.data
    precision = PRECISIONS.get(t.precision)
    problems = []

    def need(ok: bool, message: str) -> None:
        if not ok:
            problems.append(message)

    need(
        d.block_size is None or 1 <= d.block_size <= m.block_size,
        f"data.block_size={d.block_size} is above the model's context model.block_size={m.block_size}; "
        "lower data.block_size or raise model.block_size",
    )
    if precision is not None:
        need(
            not (f.loss == "fused" and precision.loss_scaling),
            "fast.loss=fused writes the loss's gradient in fp16 before the GradScaler scales it (small ones would "
            "underflow to 0): use precision=bf16 or fast.loss=plain",
        )
        need(
            not (cfg.optim.fused and precision.loss_scaling),
            "optim.fused=true cannot run under precision=fp16: lmtrain clips inside fused AdamW's step, on "
            "gradients the GradScaler has not unscaled yet; use optim.fused=null (foreach AdamW) or precision=bf16",
        )
        need(
            not f.cast_weights_once or precision.autocast,
            f"fast.cast_weights_once casts for autocast, which precision={t.precision} does not use: "
            "use precision=bf16 or fp16, or fast.cast_weights_once=false",
        )
    several = world_size(cfg) > 1 or any(s in str(t.strategy).lower() for s in ("ddp", "fsdp"))
    for key, reason in SINGLE_PROCESS_OPTIONS.items():
        need(not (f[key] and several), f"fast.{key} trains one process: {reason} (use fast.{key}=false)")
    need(
        not (f.compile and f.compile_scope == "blocks" and "fsdp" in str(t.strategy).lower()),
        "fast.compile_scope=blocks compiles the blocks before FSDP wraps them: use fast.compile_scope=model",
    )
    sample = cfg.callbacks.get("sample_text")
    if sample is not None:
        temperature = sample.get("temperature")  # a key left out keeps SampleText's own default
        temperatures = [] if temperature is None else [temperature]
        problems += sampling_problems(
            "callbacks.sample_text.", temperatures, sample.get("top_k"), None, sample.get("max_new_tokens")
        )
    return problems


def check_machine(cfg: DictConfig) -> None:
    """What the config asks of this machine's devices, before anything is built: one UserError."""
    problems = device_problems(cfg)
    if problems:
        raise UserError("; ".join(problems))
    if PRECISIONS[cfg.trainer.precision].compute == "bfloat16" and not trains_on_gpu(cfg):
        say(
            "note: precision=bf16 on the CPU runs under CPU autocast, slower than fp32 on most CPUs; "
            "precision=auto picks fp32 here and bf16 on a GPU",
            err=True,
        )


def device_problems(cfg: DictConfig) -> list[str]:
    """Settings that need a GPU (or, for the Triton loss, the Triton interpreter) on a machine without one."""
    import importlib.util
    import os

    import torch

    compute, on_gpu = PRECISIONS[cfg.trainer.precision].compute, trains_on_gpu(cfg)
    problems = []
    if compute == "bfloat16" and on_gpu and not torch.cuda.is_bf16_supported():
        problems.append("precision=bf16 needs a GPU with bfloat16 (Ampere or newer); use precision=auto or fp16")
    if compute == "float16" and not on_gpu:
        problems.append("precision=fp16 needs a CUDA GPU; use precision=auto (fp32 on the CPU)")
    if cfg.fast.cuda_graphs and not (on_gpu and torch.cuda.is_available()):
        problems.append("fast.cuda_graphs=true replays CUDA graphs: it needs a CUDA GPU; set fast.cuda_graphs=false")
    triton_runs = on_gpu or os.environ.get("TRITON_INTERPRET") == "1"
    if cfg.fast.loss == "fused" and not (triton_runs and importlib.util.find_spec("triton")):
        problems.append(
            "fast.loss=fused runs a Triton kernel: it needs a CUDA GPU and the triton package; set fast.loss=plain"
        )
    return problems


def world_size(cfg: DictConfig) -> int:
    """Processes that will train: devices per node x nodes (auto: every GPU, or one CPU process)."""
    import torch

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


def schedule_problems(o, max_steps: int) -> list[str]:
    """The optimizer settings the schedule depends on (shared by training and `lmtrain.schedule`)."""
    checks = [
        (o.name in ("adamw", "muon"), f"optim.name={o.name!r} must be adamw or muon"),
        (o.max_lr > 0, f"optim.max_lr={o.max_lr} must be positive"),
        (0 <= o.min_lr <= o.max_lr, f"optim.min_lr={o.min_lr} must be between 0 and optim.max_lr={o.max_lr}"),
        (o.warmup_steps >= 0, f"optim.warmup_steps={o.warmup_steps} must not be negative"),
        (
            o.warmup_steps <= max_steps,
            f"optim.warmup_steps={o.warmup_steps} exceeds trainer.max_steps={max_steps}; add "
            f"optim.warmup_steps={max_steps // 10} (a tenth of the run) or train longer",
        ),
    ]
    return [message for ok, message in checks if not ok]


def validate_schedule(cfg: DictConfig) -> None:
    problems = unknown_key_problems(cfg, ("optim", "trainer"))
    if cfg.trainer.max_steps < 1:
        problems.append(f"trainer.max_steps={cfg.trainer.max_steps} must be at least 1")
    problems += schedule_problems(cfg.optim, cfg.trainer.max_steps)
    problems += nonfinite_problems(OmegaConf.to_container(cfg.optim, resolve=True), "optim.")
    if problems:
        raise UserError("; ".join(problems))


def _divisor_near(n: int, k: int) -> int:
    return min((d for d in range(1, n + 1) if n % d == 0), key=lambda d: abs(d - k))


def to_container(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
