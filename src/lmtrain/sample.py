"""Sample from a checkpoint: `python -m lmtrain.sample ckpt_path=<run>/checkpoints/best.ckpt [key=value ...]`.

Each prompt at each temperature, streamed token by token, as the lesson's generate_samples prints them.
The model and the tokenizer both come from the checkpoint; the same seed gives the same text.
    python -m lmtrain.sample ckpt_path=... prompts='["ROMEO:\\n"]' temperatures='[0.8]' top_p=0.9
    python -m lmtrain.sample init_from=hf/shakespeare temperatures='[0]'   # an exported folder or gpt2 ... gpt2-xl
"""

from __future__ import annotations

import sys

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .checkpointing import load_model
from .cli import command
from .config import unknown_key_problems
from .errors import UserError, describe_hydra_error
from .model import GPT
from .tokenizer import encode_prompt


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


def stream_sample(model: GPT, tokenizer, prompt: str, generator: torch.Generator, out=None, **options) -> str:
    """Generate from `prompt`, writing the text as tokens arrive (to `out`, else stdout); returns the whole text."""
    out = out or sys.stdout  # looked up now: a default bound at import would miss a redirected stdout
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
    if cfg.get("ckpt_path") is None and cfg.get("init_from") is None:
        raise UserError(
            "ckpt_path is missing; give the checkpoint to sample: ckpt_path=<run>/checkpoints/best.ckpt, "
            "or pretrained weights: init_from=gpt2 (gpt2-medium, gpt2-large, gpt2-xl, a transformers folder)"
        )
    try:
        problems = unknown_key_problems(cfg, ()) or OmegaConf.to_object(cfg).problems()
    except OmegaConfBaseException as err:  # an interpolation of a key not there: ${seeds}
        raise UserError(describe_hydra_error(err)) from err
    if problems:
        raise UserError("; ".join(problems))
    device = pick_device(cfg.device)
    if cfg.ckpt_path is not None:
        model, tokenizer = load_model(cfg.ckpt_path, device, cfg.cache_dir, cfg.mirror)
    else:
        from .hf import pretrained_model

        model, tokenizer = pretrained_model(cfg.init_from, cfg.cache_dir, cfg.mirror)
        model = model.to(device)
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
