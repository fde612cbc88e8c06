"""Export a checkpoint for transformers: `python -m lmtrain.export ckpt_path=<run>/checkpoints/best.ckpt out=<folder>`.

The folder loads with AutoModelForCausalLM.from_pretrained and AutoTokenizer.from_pretrained: config.json,
model.safetensors and generation_config.json of a GPT2LMHeadModel (its logits are lmtrain's), the tokenizer's
files (GPT-2's, or a tokenizer.json giving our ids for char and bpe) and a model card, README.md. It is written
into a temporary folder beside `out` and renamed into place: whole, or not at all.
    python -m lmtrain.export ckpt_path=... out=hf/shakespeare [overwrite=true] [prompt='KING:\\n']
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from . import __version__
from .checkpointing import load_checkpoint, load_model
from .cli import command
from .config import unknown_key_problems
from .errors import UserError, describe_hydra_error
from .fileio import atomic_folder
from .model import GPT
from .tokenizer import encode_prompt

SAMPLE_SETTINGS = {"temperature": 0.8, "top_k": 40}  # the card's sample, drawn as samples.txt's are
END_OF_TEXT = "<|endoftext|>"


def export(cfg: DictConfig) -> Path:
    try:
        problems = unknown_key_problems(cfg, ()) or OmegaConf.to_object(cfg).problems()
    except OmegaConfBaseException as err:  # an interpolation of a key not there: ${nope}
        raise UserError(describe_hydra_error(err)) from err
    if problems:
        raise UserError("; ".join(problems))
    out = Path(cfg.out).expanduser()
    check_out(out, cfg.overwrite)
    from . import hf
    from .tokenizer import hf as hf_tokenizer

    hf.require_extra("lmtrain.export")
    model, tokenizer = load_model(cfg.ckpt_path, torch.device("cpu"), cfg.cache_dir, cfg.mirror)
    blockers = hf.unexportable(model.config)
    if tokenizer.kind not in hf_tokenizer.EXPORTED_KINDS:
        blockers.append(
            f"tokenizer={tokenizer.kind} (its files: export one of {', '.join(hf_tokenizer.EXPORTED_KINDS)})"
        )
    if blockers:
        raise UserError(
            f"checkpoint {cfg.ckpt_path} cannot be exported to transformers' GPT-2: {', '.join(blockers)} "
            "have no equivalent there; export a model trained without them"
        )
    card = model_card(Path(cfg.ckpt_path), model, tokenizer, card_sample(model, tokenizer, cfg), out)
    with atomic_folder(out) as folder:
        hf.write_gpt2(model, folder, end_of_text_id(tokenizer))
        hf_tokenizer.save_pretrained(tokenizer, folder, cfg.cache_dir, cfg.mirror, model.config.block_size)
        (folder / "README.md").write_text(card, encoding="utf-8")
    print(f"wrote {out}: AutoModelForCausalLM.from_pretrained({str(out)!r}) and AutoTokenizer load it")
    return out


def check_out(out: Path, overwrite: bool) -> None:
    """`out` is new, an empty folder, or (overwrite=true) a folder to replace: checked before any work."""
    if out.exists() and not out.is_dir():
        raise UserError(f"out={out} is a file; give a folder to write the model into")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"out={out} is a folder that is not empty; give a new folder, or overwrite=true to replace it")


def end_of_text_id(tokenizer) -> int | None:
    """GPT-2's <|endoftext|> (50256), or a bpe special token of that name: the model's bos and eos."""
    if tokenizer.kind == "gpt2":
        return tokenizer.encoding.eot_token
    return getattr(tokenizer, "special_tokens", {}).get(END_OF_TEXT)


def card_sample(model: GPT, tokenizer, cfg: DictConfig) -> str:
    """The model card's sample: `prompt`, then max_new_tokens drawn as the run's samples.txt draws them."""
    ids = encode_prompt(tokenizer, cfg.prompt.replace("\\n", "\n"), "prompt")
    generator = torch.Generator().manual_seed(cfg.seed)
    out = model.generate(torch.tensor([ids]), cfg.max_new_tokens, generator=generator, **SAMPLE_SETTINGS)
    return tokenizer.decode(out[0].tolist())


def model_card(ckpt_path: Path, model: GPT, tokenizer, sample: str, out: Path) -> str:
    """README.md: what the model is, its results in nats and bits per character, a sample, its training config
    and how it was made."""
    c = model.config
    run = ckpt_path.resolve().parent.parent if ckpt_path.resolve().parent.name == "checkpoints" else None
    checkpoint = load_checkpoint(ckpt_path, mmap=True)  # mapped: its settings read, not its weights
    step = checkpoint.get("global_step")
    padding = c.padded_vocab_size - c.vocab_size
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        "tags: [lmtrain, gpt2]",
        "---",
        "",
        f"# {run.name if run else ckpt_path.stem}: a GPT trained with lmtrain",
        "",
        f"A GPT-2-shaped decoder ({c.n_layer} layers, {c.n_head} heads, {c.n_embd} dims, a context of "
        f"{c.block_size} tokens, {model.num_params() / 1e6:.2f} M parameters, "
        f"{'GELU (tanh)' if c.mlp == 'gelu_tanh' else 'GELU (erf)'}, {'with' if c.bias else 'without'} biases) "
        f"on the {tokenizer.kind} tokenizer ({tokenizer.vocab_size} ids"
        + (f"; the embedding has {padding} more rows of padding, which generation never draws" if padding else "")
        + ").",
        "",
        "## Results",
        "",
        results(run, step),
        "",
        "## A sample",
        "",
        f"Temperature {SAMPLE_SETTINGS['temperature']}, top-k {SAMPLE_SETTINGS['top_k']}:",
        "",
        "```text",
        sample.replace("```", "'''"),
        "```",
        "",
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        f"tok, model = AutoTokenizer.from_pretrained({str(out)!r}), AutoModelForCausalLM.from_pretrained({str(out)!r})",
        'ids = tok("ROMEO:\\n", return_tensors="pt").input_ids',
        "print(tok.decode(model.generate(ids, do_sample=False, max_new_tokens=50)[0]))",
        "```",
        "",
        f"Beyond {c.block_size} tokens transformers' GPT-2 has no positions; lmtrain slides its window instead.",
        "",
        "## Training config",
        "",
        "```yaml",
        training_config(run, checkpoint.get("hyper_parameters", {})).rstrip(),
        "```",
        "",
        "## How it was made",
        "",
        f"Trained with lmtrain {__version__} and exported from `{ckpt_path}` (step {step}) with "
        f"`python -m lmtrain.export ckpt_path={ckpt_path} out={out}`. The weights are lmtrain's, mapped onto "
        "GPT2LMHeadModel (Conv1D's transposed matrices, absent biases as zeros); its logits equal lmtrain's within "
        "1e-5 in float32, and greedy generation continues a prompt as `lmtrain.sample temperatures='[0]'` does. "
        "lmtrain_tokenizer.json is lmtrain's own tokenizer state, for `init_from=` this folder.",
        "",
    ]
    return "\n".join(lines)


def results(run: Path | None, step) -> str:
    """Best val loss and bits per character, from the run's summary.json."""
    try:
        summary = json.loads((run / "summary.json").read_text(encoding="utf-8")) if run else None
        loss, bpc, best = summary["best_val_loss"], summary["best_val_bpc"], summary["best_step"]
    except (OSError, ValueError, TypeError, KeyError, RecursionError):
        return "Not recorded: the checkpoint is not in a run folder with its summary.json."
    if not (isinstance(loss, float) and isinstance(bpc, float) and math.isfinite(loss)):
        return "Not recorded: the run ended before an evaluation."
    which = "this checkpoint's" if best == step else f"the run's best (this checkpoint is step {step})"
    return (
        f"Best validation loss {loss:.4f} nats per token, {bpc:.3f} bits per character, at step {best}: "
        f"{which}. Bits per character compare models across tokenizers."
    )


def training_config(run: Path | None, hparams: dict) -> str:
    """The run's .hydra/config.yaml, or the settings the checkpoint holds."""
    if run is not None and (run / ".hydra" / "config.yaml").is_file():
        try:
            return (run / ".hydra" / "config.yaml").read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            pass
    kept = {key: value for key, value in hparams.items() if key != "tokenizer_state"}
    return yaml.safe_dump(kept, sort_keys=False)


main = command(export, config_name="export")


if __name__ == "__main__":
    main()
