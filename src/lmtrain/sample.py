"""Sample from a checkpoint: `python -m lmtrain.sample ckpt_path=<run>/checkpoints/best.ckpt [key=value ...]`.

Each prompt at each temperature, streamed token by token, as the lesson's generate_samples prints them.
The model and the tokenizer both come from the checkpoint; the same seed gives the same text.
    python -m lmtrain.sample ckpt_path=... prompts='["ROMEO:\\n"]' temperatures='[0.8]' top_p=0.9
"""

from __future__ import annotations

import sys

import torch
from omegaconf import DictConfig, OmegaConf

from .checkpointing import load_checkpoint
from .cli import command
from .errors import UserError
from .model import GPT
from .module import gpt_config
from .tokenizer import encode_prompt, from_state


def load_model(ckpt_path: str, device: torch.device, cache_dir: str, mirror: str | None):
    """The GPT and the tokenizer a checkpoint was trained with."""
    checkpoint = load_checkpoint(ckpt_path)
    hparams = checkpoint.get("hyper_parameters", {})
    if "model" not in hparams or "tokenizer_state" not in hparams:
        raise UserError(f"checkpoint {ckpt_path} has no model or tokenizer settings; was it written by lmtrain?")
    model = GPT(gpt_config(hparams["model"]))
    tokenizer = from_state(hparams["tokenizer_state"], cache_dir, mirror)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise UserError(
            f"checkpoint {ckpt_path}: its tokenizer ({tokenizer.kind}, {tokenizer.vocab_size} ids) does not fit its "
            f"model ({model.config.vocab_size} ids); the file mixes two runs, use a checkpoint written by one run"
        )
    weights = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    model.load_state_dict(weights)
    return model.to(device).eval(), tokenizer


def pick_device(name: str) -> torch.device:
    """`auto`: CUDA where there is one, else the CPU; any other name must exist here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise UserError(f"device={name!r} is not a device name; use auto, cpu or cuda") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={name} but this machine has no CUDA GPU; use device=cpu or device=auto")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"device={name}: lmtrain samples on cpu or cuda; use device=auto")
    return device


def stream_sample(model: GPT, tokenizer, prompt: str, generator: torch.Generator, out=sys.stdout, **options) -> str:
    """Generate from `prompt`, writing the text as tokens arrive; returns the whole text."""
    device = next(model.parameters()).device
    ids = encode_prompt(tokenizer, prompt, "prompts")
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    text = tokenizer.decode(ids)
    out.write(text)
    for next_id in model.generate_stream(idx, generator=generator, **options):
        ids.append(int(next_id))
        full = tokenizer.decode(ids)
        if not full.endswith("\ufffd"):  # a multi-byte character still incomplete: wait for its other bytes
            out.write(full[len(text) :])
            out.flush()
            text = full
    return tokenizer.decode(ids)


def sample(cfg: DictConfig) -> None:
    problems = OmegaConf.to_object(cfg).problems()
    if problems:
        raise UserError("; ".join(problems))
    device = pick_device(cfg.device)
    model, tokenizer = load_model(cfg.ckpt_path, device, cfg.cache_dir, cfg.mirror)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    number = 0
    with autocast:
        for prompt in cfg.prompts:
            prompt = prompt.replace("\\n", "\n")
            print(f"\nPrompt: {prompt!r}")
            for temperature in cfg.temperatures:
                for _ in range(cfg.num_samples):
                    print(f"\n  [temp={temperature}]:")
                    generator = torch.Generator(device=device).manual_seed(cfg.seed + number)
                    number += 1
                    stream_sample(
                        model,
                        tokenizer,
                        prompt,
                        generator,
                        max_new_tokens=cfg.max_new_tokens,
                        temperature=temperature,
                        top_k=cfg.top_k,
                        top_p=cfg.top_p,
                        use_cache=cfg.use_cache,
                    )
                    print()


main = command(sample, config_name="sample")


if __name__ == "__main__":
    main()
