"""Hugging Face in and out: lmtrain.export, init_from in sample and train, hub names, the tokenizer files.

Exact in both directions on tiny models: lmtrain's logits and transformers' within 1e-5 (fp32, CPU), the same greedy
text, the same ids from the exported tokenizer, the same weights after a round trip. Every bad input one line.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from dataclasses import asdict
from pathlib import Path
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

from lmtrain import config, hf
from lmtrain import export as export_main
from lmtrain import sample as sample_main
from lmtrain.errors import UserError
from lmtrain.model import GPT, GPTConfig
from lmtrain.tokenizer.bpe import from_gpt2_files
from lmtrain.tokenizer.bpe_train import train_bpe
from lmtrain.tokenizer.char import CharTokenizer
from lmtrain.tokenizer.gpt2 import load_gpt2
from lmtrain.tokenizer.hf import save_pretrained

from .conftest import MIRROR, SHAKESPEARE, compose, process_state_kept, run_cli, train_here
from .test_docs import documented, schema_keys

TEXT = SHAKESPEARE.read_text(encoding="utf-8")
HELD_OUT = TEXT[-3000:]  # the end of the validation split: text no tokenizer here was trained on
CACHE = "~/.cache/lmtrain-unused"  # GPT-2's files come from the mirror; LMTRAIN_CACHE is the tests' own


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    cache = Path(tmp_path_factory.mktemp("tok-cache"))
    return {
        "char": CharTokenizer.from_text(TEXT),
        "bpe": train_bpe([TEXT[:200_000]], 600, "gpt2", ["<|endoftext|>"]),
        "gpt2": load_gpt2(cache, MIRROR),
    }


def wide(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every weight and bias drawn wide: logits far apart, a varied greedy text."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            gain = name.endswith("weight") and p.dim() == 1  # a norm's: around 1
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3 + gain)
    return model.eval()


def lmtrain_checkpoint(path: Path, model: GPT, tokenizer, step: int = 7) -> Path:
    """A checkpoint as lmtrain's training writes one: weights under model., the settings, the tokenizer state."""
    hparams = {"model": asdict(model.config), "tokenizer_state": tokenizer.state(), "max_steps": step}
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": hparams, "global_step": step}, path)
    return path


def gpt2_folder(folder: Path, activation: str = "gelu_new", vocab: int = 50257, tokenizer: bool = True) -> Path:
    """A small random GPT2LMHeadModel saved by transformers, biases and norm gains random too, with GPT-2's
    vocabulary file beside it."""
    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_head=2, n_embd=16, n_positions=32, vocab_size=vocab, activation_function=activation)
    wide(GPT2LMHeadModel(cfg)).save_pretrained(folder)
    if tokenizer:
        shutil.copy(MIRROR / "gpt2" / "encoder.json", folder / "vocab.json")
        shutil.copy(MIRROR / "gpt2" / "vocab.bpe", folder / "merges.txt")
    return folder


def export_here(*overrides: str) -> Path:
    with process_state_kept(), contextlib.redirect_stdout(io.StringIO()):
        return export_main.export(compose(*overrides, config_name="export"))


def sample_here(*overrides: str) -> str:
    printed = io.StringIO()
    with process_state_kept(), contextlib.redirect_stdout(printed):
        sample_main.sample(compose(*overrides, config_name="sample"))
    return printed.getvalue()


def greedy_hf(folder: Path, ids: list[int], n: int) -> list[int]:
    """transformers' greedy continuation; no pad_token_id, which would mask a prompt's ids equal to it."""
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=n)
    return out[0, len(ids) :].tolist()


# --- out ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kind,mlp,bias", [("char", "gelu", False), ("bpe", "gelu_tanh", True), ("gpt2", "gelu_tanh", False)]
)
def test_an_export_computes_what_lmtrain_does(tokenizers, tmp_path, kind, mlp, bias):
    tokenizer = tokenizers[kind]
    torch.manual_seed(0)
    model = wide(GPT(GPTConfig(tokenizer.vocab_size, 48, 2, 2, 16, bias=bias, mlp=mlp)))
    ckpt = lmtrain_checkpoint(tmp_path / "best.ckpt", model, tokenizer)
    out = export_here(f"ckpt_path={ckpt}", f"out={tmp_path / 'hf'}", "max_new_tokens=5")
    assert {p.name for p in out.iterdir()} >= {
        "config.json",
        "model.safetensors",
        "generation_config.json",
        "README.md",
    }
    hf_tokenizer, hf_model = AutoTokenizer.from_pretrained(out), AutoModelForCausalLM.from_pretrained(out).eval()
    ids = tokenizer.encode(HELD_OUT)
    assert hf_tokenizer.encode(HELD_OUT, add_special_tokens=False) == ids  # our ids, from transformers
    assert hf_tokenizer.decode(ids) == HELD_OUT
    window = torch.tensor([ids[:48], ids[48:96]])
    with torch.no_grad():
        ours, theirs = model(window), hf_model(window).logits
    assert theirs.shape[-1] == model.config.padded_vocab_size  # the padded table kept
    torch.testing.assert_close(theirs[..., : tokenizer.vocab_size], ours, atol=1e-5, rtol=0)
    prompt = tokenizer.encode("ROMEO:\n")
    assert (
        greedy_hf(out, prompt, 30)
        == model.generate(torch.tensor([prompt]), 30, temperature=0)[0, len(prompt) :].tolist()
    )
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "library_name: transformers" in card and "ROMEO:" in card and "max_steps: 7" in card


def test_the_tokenizer_files_give_our_ids(tmp_path):
    """Our BPE of every pattern, special tokens, GPT-2's converted files, on text with what each pattern splits."""
    text = HELD_OUT + " <|endoftext|> café naïve 日本語 \t\x0b  x\r\n 123456 don't DON'T"
    cases = {p: train_bpe([TEXT[:100_000]], 400, p, ["<|endoftext|>"]) for p in ("gpt2", "gpt4", "none")}
    cases["gpt2 files"] = from_gpt2_files(MIRROR / "gpt2")
    for name, tokenizer in cases.items():
        folder = tmp_path / name.replace(" ", "_")
        folder.mkdir()
        save_pretrained(tokenizer, folder, CACHE, MIRROR, 64)
        theirs = AutoTokenizer.from_pretrained(folder)
        assert theirs.encode(text, add_special_tokens=False) == tokenizer.encode(text), name
        assert theirs.decode(tokenizer.encode(text)) == text, name


def test_options_without_an_equivalent_are_named_and_nothing_is_written(tokenizers, tmp_path):
    model = GPT(GPTConfig(65, 16, 1, 2, 16, rope=True, qk_norm=True, mlp="relu2", norm="rms"))
    ckpt = lmtrain_checkpoint(tmp_path / "fast.ckpt", model, tokenizers["char"])
    with pytest.raises(UserError, match=r"model\.rope=true .*model\.qk_norm=true .*model\.mlp=relu2 .*model\.norm=rms"):
        export_here(f"ckpt_path={ckpt}", f"out={tmp_path / 'hf'}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fast.ckpt"]


def test_out_is_never_overwritten_unasked_and_a_failed_write_leaves_nothing(tokenizers, tmp_path):
    ckpt = lmtrain_checkpoint(tmp_path / "best.ckpt", GPT(GPTConfig(65, 16, 1, 2, 16)), tokenizers["char"])
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(UserError, match="not empty; give a new folder, or overwrite=true"):
        export_here(f"ckpt_path={ckpt}", f"out={out}", "max_new_tokens=2")
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    with mock.patch("lmtrain.tokenizer.hf.save_pretrained", side_effect=OSError(28, "No space left on device")):
        with pytest.raises(UserError, match="the disk is full"):
            export_here(f"ckpt_path={ckpt}", f"out={out}", "overwrite=true", "max_new_tokens=2")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.ckpt", "out"]  # no temporary folder left
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    export_here(f"ckpt_path={ckpt}", f"out={out}", "overwrite=true", "max_new_tokens=2")
    assert (out / "model.safetensors").is_file() and not (out / "mine.txt").exists()
    with pytest.raises(UserError, match="is a file"):
        export_here(f"ckpt_path={ckpt}", f"out={ckpt}")
    with pytest.raises(UserError, match="out is missing"):
        export_here(f"ckpt_path={ckpt}")


def test_without_the_extra_the_command_names_it(tokenizers, tmp_path):
    ckpt = lmtrain_checkpoint(tmp_path / "best.ckpt", GPT(GPTConfig(65, 16, 1, 2, 16)), tokenizers["char"])
    with mock.patch.dict("sys.modules", {"safetensors": None}), pytest.raises(UserError, match=r"lmtrain\[hf\]"):
        export_here(f"ckpt_path={ckpt}", f"out={tmp_path / 'hf'}")
    with mock.patch.dict("sys.modules", {"transformers": None}), pytest.raises(UserError, match="transformers"):
        sample_here("init_from=gpt2")


# --- in -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("activation", ["gelu", "gelu_new"])
def test_a_transformers_gpt2_loads_exactly_and_exports_back_to_its_weights(tmp_path, activation):
    folder = gpt2_folder(tmp_path / "gpt2", activation)
    pretrained = hf.read_pretrained(str(folder), CACHE, MIRROR)
    assert pretrained.config.bias and pretrained.config.mlp == hf.FROM_ACTIVATION[activation]
    assert pretrained.tokenizer.kind == "gpt2"
    model, theirs = pretrained.model(), AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = pretrained.tokenizer.encode(HELD_OUT)[:32]
    with torch.no_grad():
        torch.testing.assert_close(model(torch.tensor([ids])), theirs(torch.tensor([ids])).logits, atol=1e-5, rtol=0)
    prompt = ids[:3]
    assert model.generate(torch.tensor([prompt]), 25, temperature=0)[0, 3:].tolist() == greedy_hf(folder, prompt, 25)
    again = tmp_path / "again"
    again.mkdir()
    hf.write_gpt2(model, again, 50256)
    original, exported = load_file(folder / "model.safetensors"), load_file(again / "model.safetensors")
    assert original.keys() == exported.keys()
    assert all(torch.equal(original[k], exported[k]) for k in original)


def test_sample_init_from_writes_what_transformers_generates(tmp_path):
    folder = gpt2_folder(tmp_path / "gpt2")
    printed = sample_here(f"init_from={folder}", "prompts=['ROMEO:\\n']", "temperatures=[0]", "max_new_tokens=20")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompt = tokenizer.encode("ROMEO:\n")
    assert tokenizer.decode(greedy_hf(folder, prompt, 20)) in printed


def test_hub_names_come_from_huggingface_hubs_cache_offline(tmp_path):
    import huggingface_hub.constants as hub

    snapshot = tmp_path / "hub" / "models--openai-community--gpt2" / "snapshots" / "0123abc"
    gpt2_folder(snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0123abc")
    with mock.patch.object(hub, "HF_HUB_CACHE", str(tmp_path / "hub")), mock.patch.object(hub, "HF_HUB_OFFLINE", True):
        assert hf.read_pretrained("gpt2", CACHE, MIRROR).folder == snapshot
        with pytest.raises(UserError, match=r"not in huggingface_hub's cache .*\(offline\).*init_from=/path/to/folder"):
            hf.read_pretrained("gpt2-xl", CACHE, MIRROR)
    from huggingface_hub.errors import RepositoryNotFoundError

    unknown = RepositoryNotFoundError("404", response=mock.Mock(headers={}, request=None))
    with mock.patch("huggingface_hub.snapshot_download", side_effect=unknown):
        with pytest.raises(UserError, match="the Hugging Face hub has no model nobody/nothing.*local folder"):
            hf.read_pretrained("nobody/nothing", CACHE, MIRROR)


def edit_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize(
    "damage,words",
    [
        ("no config", r"is not a transformers model \(no config.json\)"),
        ("llama", "is a 'llama' model"),
        ("shapes", "weight wte.weight has shape .* different models"),
        ("pickle", "has no model.safetensors .*pytorch_model.bin: lmtrain never unpickles"),
        ("untied", "an untied head has no equivalent"),
        ("relu", "activation_function='relu'"),
        ("missing weight", "they lack h.1.ln_1.weight"),
        ("truncated", "model.safetensors is damaged"),
        ("tokenizer", "its tokenizer is neither GPT-2's nor one lmtrain exported"),
        ("no tokenizer, small vocabulary", "has no tokenizer files and 100 ids"),
        ("a file", "is a file"),
    ],
)
def test_a_folder_lmtrain_cannot_read_is_one_line(tmp_path, damage, words):
    folder = gpt2_folder(tmp_path / "gpt2", vocab=100 if "small" in damage else 50257, tokenizer="tokenizer" != damage)
    weights = folder / "model.safetensors"
    if damage == "no config":
        (folder / "config.json").unlink()
    elif damage in ("llama", "shapes", "relu"):
        edit_config(folder, **{"llama": {"model_type": "llama"}, "shapes": {"n_embd": 32}, "relu": {
            "activation_function": "relu"}}[damage])  # fmt: skip
    elif damage == "pickle":
        weights.rename(folder / "pytorch_model.bin")
    elif damage in ("untied", "missing weight"):
        tensors = load_file(weights)
        if damage == "untied":
            tensors["lm_head.weight"] = torch.randn_like(tensors["transformer.wte.weight"])
        else:
            del tensors["transformer.h.1.ln_1.weight"]
        save_file(tensors, weights)
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "tokenizer":
        vocab = json.loads((MIRROR / "gpt2" / "encoder.json").read_text())
        (folder / "vocab.json").write_text(json.dumps({**vocab, "Ġthe": 5}))
    elif "small" in damage:
        (folder / "vocab.json").unlink()
    source = str(weights if damage == "a file" else folder)
    with pytest.raises(UserError, match=words) as raised:
        sample_here(f"init_from={source}", "max_new_tokens=2")
    assert "\n" not in str(raised.value)


def test_sample_takes_a_checkpoint_or_pretrained_weights_not_both(tmp_path):
    with pytest.raises(UserError, match="ckpt_path and init_from both name a model"):
        sample_here(f"ckpt_path={tmp_path / 'x.ckpt'}", "init_from=gpt2")
    with pytest.raises(UserError, match="ckpt_path is missing; .*init_from=gpt2"):
        sample_here()


# --- fine-tuning ----------------------------------------------------------------------------------
def test_the_shape_comes_from_the_weights_and_a_conflicting_override_is_an_error(tmp_path):
    from lmtrain import build

    folder = str(gpt2_folder(tmp_path / "gpt2"))
    cfg = compose(f"model.init_from={folder}", "model.n_layer=2", "model.block_size=8")
    with pytest.raises(UserError, match=r"sets model\.block_size=8 \(the weights': 32\); remove the override"):
        build.take_pretrained_shape(cfg, {"model.n_layer", "model.block_size", "model.init_from"})
    build.take_pretrained_shape(cfg, {"model.n_layer", "model.init_from"})  # n_layer agrees; gpt10m's rest replaced
    model = cfg.model
    assert (model.n_layer, model.n_head, model.n_embd, model.block_size, model.vocab_size) == (2, 2, 16, 32, 50257)
    assert model.bias and model.mlp == "gelu_tanh" and model.dropout == 0.1  # dropout: still the config's


def test_the_finetune_recipe_is_nanogpts():
    cfg = compose("experiment=finetune_shakespeare")
    assert cfg.model.init_from == "gpt2-xl" and cfg.tokenizer._target_.endswith("gpt2.build")
    assert cfg.optim.max_lr == cfg.optim.min_lr == 3e-5 and cfg.optim.warmup_steps == 0  # constant
    t = cfg.trainer
    assert (t.max_steps, t.batch_size, t.accumulate_grad_batches, t.eval_interval) == (20, 1, 32, 5)


def test_export_keys_have_rows_in_the_options_table():
    assert not schema_keys(config.ExportConfig) - documented("python -m lmtrain.export")


@pytest.mark.slow
def test_fine_tune_from_a_folder_checkpoint_export_and_report(tmp_path):
    """Fine-tuning starts from the weights (a learning rate of ~0 keeps them), its checkpoint exports back to
    them, the report states its bpc; another tokenizer, or an override of the shape on the command line, is one
    error line."""
    from lmtrain.report import report

    folder = gpt2_folder(tmp_path / "gpt2")
    run = tmp_path / "run"
    fine_tune = ("experiment=smoke", "tokenizer=gpt2", f"model.init_from={folder}", "trainer.max_steps=2")
    fine_tune += ("trainer.eval_interval=2", "optim.warmup_steps=0", "optim.max_lr=1e-12", "optim.min_lr=0")
    result = train_here(run, *fine_tune)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr
    out = export_here(f"ckpt_path={run / 'checkpoints' / 'best.ckpt'}", f"out={tmp_path / 'hf'}", "max_new_tokens=2")
    original, exported = load_file(folder / "model.safetensors"), load_file(out / "model.safetensors")
    assert all(torch.allclose(original[k], exported[k], atol=1e-6) for k in original)
    (run / ".hydra").mkdir(exist_ok=True)
    (run / ".hydra" / "config.yaml").write_text(f"model:\n  init_from: {folder}\n")
    assert f"Fine-tuned from `{folder}` (model.init_from): best val bpc" in report(run).read_text()
    other = train_here(tmp_path / "char", "experiment=smoke", f"model.init_from={folder}")
    assert other.returncode == 2 and "fine-tune with the tokenizer of the weights (tokenizer=gpt2)" in other.stderr
    cli = run_cli("lmtrain.train", *fine_tune, "model.n_embd=64", f"hydra.run.dir={tmp_path / 'cli'}")
    assert cli.returncode == 2 and cli.stderr.count("\n") == 1 and "model.n_embd=64 (the weights': 16)" in cli.stderr


@pytest.mark.slow
def test_the_export_command_as_a_user_runs_it(tokenizers, tmp_path):
    ckpt = lmtrain_checkpoint(tmp_path / "best.ckpt", GPT(GPTConfig(65, 16, 1, 2, 16)), tokenizers["char"])
    ok = run_cli("lmtrain.export", f"ckpt_path={ckpt}", f"out={tmp_path / 'hf'}", "max_new_tokens=5")
    assert ok.returncode == 0 and "wrote" in ok.stdout, ok.stderr
    again = run_cli("lmtrain.export", f"ckpt_path={ckpt}", f"out={tmp_path / 'hf'}")
    assert again.returncode == 2 and again.stderr.startswith("error: out=") and again.stderr.count("\n") == 1
