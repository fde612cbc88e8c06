"""Every config group and experiment composes; types, unknown keys and impossible values are caught."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException

from lmtrain.cli import CONFIG_DIR
from lmtrain.config import MOVED_TO_FAST, validate
from lmtrain.errors import UserError

from .conftest import compose

GROUPS = {
    group.name: sorted(p.stem for p in group.glob("*.yaml"))
    for group in Path(CONFIG_DIR).iterdir()
    if group.is_dir() and group.name not in ("hydra",)
}


@pytest.mark.parametrize("group,option", [(g, o) for g, options in GROUPS.items() for o in options])
def test_every_group_option_composes_and_validates(group, option):
    if (group, option) == ("hparams_search", "optuna"):
        pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")  # the optional extra
    extra = ["data.path=README.md"] if (group, option) == ("data", "text") else []
    if group == "fast":  # the speed presets are for a GPU in bf16; precision=auto is fp32 on a CPU
        extra.append("precision=bf16")
    cfg = compose(f"{group}={option}", *extra)
    validate(cfg)


def test_default_is_the_lessons_recipe():
    cfg = compose("model=gpt10m", "precision=bf16")
    assert (cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd, cfg.model.block_size) == (6, 6, 384, 256)
    assert (cfg.model.dropout, cfg.model.bias) == (0.1, False)
    assert cfg.trainer.precision == "bf16-mixed"
    assert (cfg.trainer.batch_size, cfg.trainer.accumulate_grad_batches, cfg.trainer.max_steps) == (64, 4, 5000)
    assert (cfg.trainer.eval_interval, cfg.trainer.eval_batches, cfg.trainer.gradient_clip_val) == (250, 20, 1.0)
    assert (cfg.optim.max_lr, cfg.optim.min_lr, cfg.optim.warmup_steps) == (3e-4, 3e-5, 200)
    assert list(cfg.optim.betas) == [0.9, 0.95] and cfg.optim.weight_decay == 0.1


@pytest.mark.parametrize("precision,lightning", [("bf16", "bf16-mixed"), ("fp16", "16-mixed"), ("fp32", "32-true")])
def test_precision_group_sets_lightning_precision(precision, lightning):
    assert compose(f"precision={precision}").trainer.precision == lightning


def test_seed_char_uses_nanogpt_character_settings():
    cfg = compose("experiment=seed_char")
    assert cfg.tokenizer._target_.endswith("char.build")
    assert (cfg.model.dropout, cfg.optim.max_lr, cfg.trainer.accumulate_grad_batches) == (0.2, 1e-3, 1)


@pytest.mark.parametrize("override", ["model.n_layerz=3", "trainer.max_step=10", "optim.foo=1"])
def test_unknown_key_is_a_composition_error(override):
    with pytest.raises(ConfigCompositionException):
        compose(override)


def test_wrong_type_is_a_composition_error():
    with pytest.raises(ConfigCompositionException):
        compose("model.n_layer=three")


@pytest.mark.parametrize(
    "override,words",
    [
        ("optim.warmup_steps=6000", "warmup_steps"),
        ("optim.min_lr=1.0", "min_lr"),
        ("model.n_head=7", "n_head"),
        ("data.block_size=512", "block_size"),
        ("trainer.batch_size=0", "batch_size"),
        ("model.dropout=1.5", "dropout"),
        ("fast.compile_scope=layers", "fast.compile_scope='layers' must be one of model, blocks"),
        ("model.norm=batchnorm", "model.norm='batchnorm' must be one of layernorm, rms"),
        ("fast.loss=whole", "fast.loss='whole' must be one of plain, chunked, fused"),
        ("fast.compile_mode=fast", "fast.compile_mode='fast' must be one of null, default, reduce-overhead"),
    ],
)
def test_impossible_values_are_named(override, words):
    with pytest.raises(UserError, match=words):
        validate(compose(override))


def test_all_problems_are_reported_at_once():
    with pytest.raises(UserError) as err:
        validate(compose("optim.min_lr=1.0", "model.n_head=7"))
    assert "min_lr" in str(err.value) and "n_head" in str(err.value)


def test_fused_loss_under_fp16_is_named():
    with pytest.raises(UserError, match="underflow.*precision=bf16 or fast.loss=plain"):
        validate(compose("fast.loss=fused", "precision=fp16"))
    validate(compose("fast.loss=fused"))  # bf16, the whole head: fine


def test_fused_adamw_under_fp16_is_named():
    with pytest.raises(UserError, match="precision=fp16: lmtrain clips inside.*optim.fused=null"):
        validate(compose("optim.fused=true", "precision=fp16"))
    validate(compose("precision=fp16"))  # foreach AdamW, unscaled by the GradScaler before clipping: fine
    validate(compose("optim.fused=true"))


def test_cuda_graphs_with_compile_copies_or_several_processes_are_named():
    for other in ("fast.compile=true", "fast.cast_weights_once=true"):
        with pytest.raises(UserError, match="fast.cuda_graphs captures the uncompiled model"):
            validate(compose("fast.cuda_graphs=true", other))
    for strategy in ("fsdp", "ddp"):
        with pytest.raises(UserError, match="fast.cuda_graphs trains one process.*fast.cuda_graphs=false"):
            validate(compose(f"trainer={strategy}", "fast.cuda_graphs=true"))
    validate(compose("fast.cuda_graphs=true"))


def test_compiled_blocks_under_fsdp_are_named():
    with pytest.raises(UserError, match="before FSDP wraps them"):
        validate(compose("trainer=fsdp", "fast.compile=true", "fast.compile_scope=blocks"))
    validate(compose("trainer=fsdp", "fast.compile=true"))


def test_weight_copies_without_autocast_or_with_several_processes_are_named():
    with pytest.raises(UserError, match="precision=32-true does not use.*fast.cast_weights_once=false"):
        validate(compose("fast.cast_weights_once=true", "precision=fp32"))
    for strategy in ("fsdp", "ddp"):
        with pytest.raises(UserError, match="trains one process.*fast.cast_weights_once=false"):
            validate(compose(f"trainer={strategy}", "fast.cast_weights_once=true"))
    validate(compose("fast.cast_weights_once=true", "precision=fp16"))


def test_the_speed_switches_are_not_architecture():
    model_keys = set(compose().model)
    assert not model_keys & set(MOVED_TO_FAST) and set(compose().fast) >= {"compile", "loss", "cuda_graphs"}


def test_a_zero_width_is_named_not_a_crash():  # found by the override fuzz test
    with pytest.raises(UserError, match="model.n_embd=0 must be at least 1"):
        validate(compose("model.n_layer=0", "model.n_embd=0"))


@pytest.mark.parametrize(
    "override,words",
    [
        ("optim.max_lr=inf", "optim.max_lr=inf must be a finite number"),
        ("model.dropout=nan", "model.dropout=nan must be a finite number"),
        ("seed=-1", r"seed=-1 must be in \[0, 2\^32\)"),
        ("trainer.devices=0", "trainer.devices=0 must be at least 1"),
        ("callbacks.sample_text.top_k=0", "callbacks.sample_text.top_k=0 must be at least 1"),
        ("callbacks.sample_text.temperature=-1", "callbacks.sample_text.temperature=-1 must be 0"),
    ],
)
def test_settings_that_could_only_fail_later_are_refused_before_training(override, words):
    with pytest.raises(UserError, match=words):
        validate(compose("experiment=smoke", override))


@pytest.mark.parametrize(
    "override,words",
    [
        ("+trainer.max_step=2", "trainer.max_step is not a setting of lmtrain; did you mean trainer.max_steps?"),
        ("+seeds=3", "seeds is not a setting of lmtrain; did you mean seed?"),
        ("+model.cuda_graphs=true", "model.cuda_graphs moved to the fast group: use fast.cuda_graphs"),
    ],
)
def test_a_key_added_with_plus_that_no_schema_has_is_refused(override, words):
    with pytest.raises(UserError, match=re.escape(words)):
        validate(compose("experiment=smoke", override))
