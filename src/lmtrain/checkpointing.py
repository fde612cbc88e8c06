"""Checkpoint files: written atomically, read with clear errors (the model and tokenizer in one), `ckpt_path=last`
resolved."""

from __future__ import annotations

import pickle
import random
import re
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from .errors import UserError
from .fileio import atomic_write
from .model import GPT
from .module import gpt_config
from .tokenizer import from_state

CHECKPOINT_DIR = "checkpoints"


class AtomicCheckpointIO(TorchCheckpointIO):
    """torch.save into a temporary file beside the target, fsync, rename: a checkpoint is whole or absent."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        atomic_write(path, lambda f: torch.save(checkpoint, f))

    def load_checkpoint(self, path, map_location=None, weights_only=None) -> dict:
        return load_checkpoint(path, map_location=map_location)


def load_checkpoint(path, map_location="cpu", mmap: bool = False) -> dict:
    """The checkpoint at path, or a UserError that says what is wrong with it and what to do instead.
    mmap: map the file rather than read it (a check before Lightning loads it for real costs no read)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist; {_good_ones(path.parent)}")
    try:
        # weights_only: torch's restricted unpickler, which builds tensors, containers and numbers and refuses any
        # other object before calling it, so a crafted file runs none of its code. lmtrain writes nothing else.
        checkpoint = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        refused = re.search(r"GLOBAL ([\w.]+)", str(err))
        what = f"it asks for {refused[1]}" if refused else "a pickle torch's safe loader does not read"
        raise UserError(
            f"checkpoint {path} holds objects that lmtrain never writes ({what}): "
            f"refused without running any of its code; {_good_ones(path.parent, exclude=path)}"
        ) from err
    except Exception as err:  # noqa: BLE001 - a damaged file fails in many ways inside the unpickler
        if isinstance(err, UserError):
            raise
        raise UserError(
            f"checkpoint {path} is truncated or not a checkpoint ({type(err).__name__}); "
            f"{_good_ones(path.parent, exclude=path)}"
        ) from err
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise UserError(
            f"{path} is not a Lightning checkpoint written by lmtrain; {_good_ones(path.parent, exclude=path)}"
        )
    return checkpoint


def load_model(ckpt_path: str, device: torch.device, cache_dir: str, mirror: str | None):
    """The GPT and the tokenizer a checkpoint was trained with."""
    folder = Path(ckpt_path)
    if folder.is_dir():
        best = next((p for p in (folder / "checkpoints" / "best.ckpt", folder / "best.ckpt") if p.is_file()), None)
        raise UserError(
            f"ckpt_path={ckpt_path} is a folder; give a checkpoint file, e.g. "
            f"ckpt_path={best or '<run>/checkpoints/best.ckpt'}"
        )
    checkpoint = load_checkpoint(ckpt_path)
    hparams = checkpoint.get("hyper_parameters", {})
    if not isinstance(hparams, dict) or "model" not in hparams or "tokenizer_state" not in hparams:
        raise UserError(f"checkpoint {ckpt_path} has no model or tokenizer settings; was it written by lmtrain?")
    try:
        model = GPT(gpt_config(hparams["model"]))
        tokenizer = from_state(hparams["tokenizer_state"], cache_dir, mirror)
        weights = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
        model.load_state_dict(weights)
    except (AssertionError, AttributeError, KeyError, RuntimeError, TypeError, ValueError) as err:
        raise UserError(
            f"checkpoint {ckpt_path}: its model settings, tokenizer and weights do not fit together "
            f"({type(err).__name__}); the file is damaged or not lmtrain's, use a checkpoint lmtrain wrote"
        ) from err
    if tokenizer.vocab_size > model.config.vocab_size:
        raise UserError(
            f"checkpoint {ckpt_path}: its tokenizer ({tokenizer.kind}, {tokenizer.vocab_size} ids) does not fit its "
            f"model ({model.config.vocab_size} ids); the file mixes two runs, use a checkpoint written by one run"
        )
    return model.to(device).eval(), tokenizer


def _good_ones(folder: Path, exclude: Path | None = None) -> str:
    others = [p for p in sorted(folder.glob("*.ckpt")) if p.resolve() != (exclude.resolve() if exclude else None)]
    if not others:
        return "start a new run without ckpt_path"
    return "resume from another checkpoint, e.g. ckpt_path=" + str(others[-1])


def newest_matching_run(cfg, outputs: Path) -> Path | None:
    """The newest run folder under `outputs` whose recorded config equals `cfg` (ckpt_path and output_dir
    aside) and which holds a checkpoint: what `ckpt_path=last` resumes without `hydra.run.dir`."""
    from omegaconf import OmegaConf

    from .config import resolve_auto_precision

    def comparable(config) -> dict:
        tree = OmegaConf.to_container(config, resolve=False)
        return {k: v for k, v in tree.items() if k not in ("ckpt_path", "output_dir", "hydra")}

    wanted = comparable(cfg)
    runs = [
        p.parent.parent for p in outputs.glob("**/.hydra/config.yaml") if (p.parent.parent / CHECKPOINT_DIR).is_dir()
    ]
    for run in sorted(runs, key=lambda r: (r / CHECKPOINT_DIR).stat().st_mtime, reverse=True):
        try:
            recorded_config = OmegaConf.load(run / ".hydra/config.yaml")
            resolve_auto_precision(recorded_config)  # as `cfg` was, by validate
            recorded = comparable(recorded_config)
        except Exception:  # noqa: BLE001 - a damaged or foreign run folder is not the one to resume
            continue
        if recorded == wanted and any((run / CHECKPOINT_DIR).glob("*.ckpt")):
            return run
    return None


def resolve_ckpt_path(ckpt_path: str | None, output_dir: Path) -> str | None:
    """None, a checkpoint file, or "last": the newest loadable checkpoint of this run folder."""
    if ckpt_path is None:
        return None
    if ckpt_path != "last":
        load_checkpoint(ckpt_path, mmap=True)  # fail early, with a clear message, on a missing or broken file
        return ckpt_path
    folder = output_dir / CHECKPOINT_DIR
    resumable = {}  # global step -> file, by what each checkpoint says (a copy or a `touch` changes no step)
    files = sorted(folder.glob("*.ckpt"), key=lambda p: (not p.name.startswith("step-"), p.name))  # ours first
    for candidate in files:  # last.ckpt dangling, or a damaged file: passed over
        try:
            checkpoint = load_checkpoint(candidate, mmap=True)
        except UserError:
            continue
        if "optimizer_states" in checkpoint:
            step = checkpoint.get("global_step")
            resumable.setdefault(step if isinstance(step, int) else -1, candidate.resolve())
    if not resumable:
        raise UserError(
            f"ckpt_path=last found no resumable checkpoint in {folder}; "
            "point hydra.run.dir at the run folder to resume, or give ckpt_path=<file>"
        )
    return str(resumable[max(resumable)])


def capture_rng_state() -> dict:
    """Every RNG stream a training step may draw from, in types the safe unpickler reads back."""
    state = {
        "python": random.getstate(),
        "numpy": [np.asarray(x).tolist() if isinstance(x, np.ndarray) else x for x in np.random.get_state()],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate(_as_tuple(state["python"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value):
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value
