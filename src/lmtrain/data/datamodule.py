"""The LightningDataModules: random training windows and fixed evaluation windows over a corpus's ids.

TextDataModule tokenizes a text once (cached) and keeps its ids on the device; PreparedDataModule maps the
shards `lmtrain.prepare` wrote, on the device where they fit, else on the host. Both draw micro-batch i from a
generator seeded by (seed, i), so resume and the split over ranks need no data state.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from ..errors import UserError
from .corpus import Corpus, TokenizerFactory, prepare_corpus
from .shards import SPLITS, PreparedCorpus, open_prepared
from .windows import DeviceTokens, FixedWindows, HostTokens, RandomWindows, full_pass_starts, random_starts


class WindowDataModule(L.LightningDataModule):
    """What both data modules share: the windows; a subclass says where each split's ids are."""

    def __init__(
        self,
        *,
        block_size: int,
        batch_size: int,
        train_batches: int,
        eval_batches: int | None,
        seed: int,
        eval_train: bool,
        cache_dir: str,
        mirror: str | None,
    ):
        super().__init__()
        self.block_size, self.batch_size, self.seed = block_size, batch_size, seed
        self.train_batches = train_batches  # micro-batches in the whole run
        self.eval_batches = eval_batches  # None: one full pass over the split
        self.eval_train = eval_train  # the training split is evaluated after the validation split
        self.mirror = Path(mirror).expanduser() if mirror else None
        self.cache_dir = Path(cache_dir).expanduser()
        self._tokens: dict[str, DeviceTokens | HostTokens] = {}

    # a subclass gives: tokenizer, chars_per_token(split), bytes_per_token(split), split_tokens(split, device)

    def prepare_data(self) -> None:
        """Download, tokenize or check the corpus, once, on one process."""
        _ = self.tokenizer

    def setup(self, stage: str) -> None:
        if self._tokens:
            return
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        for split in SPLITS:
            self._tokens[split] = self.split_tokens(split, device)

    def _rank_and_world(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def _first_batch(self) -> int:
        return self.trainer.global_step * self.trainer.accumulate_grad_batches if self.trainer else 0

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank_and_world()
        windows = RandomWindows(
            self._tokens["train"],
            self.block_size,
            self.batch_size,
            self.seed,
            self.train_batches,
            self._first_batch,
            rank=rank,
            world_size=world,
        )
        return _loader(windows)

    def eval_windows(self, split: str) -> FixedWindows:
        """Fixed windows of a split for evaluation, in batches of batch_size x world size: each rank
        evaluates its slice of every batch, so the set is the same for any world size."""
        tokens = self._tokens[split]
        rank, world = self._rank_and_world()
        size = self.batch_size * world
        if self.eval_batches is None:
            starts = full_pass_starts(len(tokens), self.block_size, size)
        else:
            starts = random_starts(len(tokens), self.block_size, size, self.eval_batches, self.seed + 1)
        mine = [s[rank * self.batch_size : (rank + 1) * self.batch_size] for s in starts]
        return FixedWindows(tokens, [s for s in mine if len(s)], self.block_size)

    def val_dataloader(self) -> list[DataLoader]:
        splits = ("val", "train") if self.eval_train else ("val",)
        return [_loader(self.eval_windows(split)) for split in splits]


class TextDataModule(WindowDataModule):
    """A text (TinyShakespeare, or data.path) split 90/10 by characters, its ids cached and kept on the device."""

    def __init__(
        self,
        *,
        tokenizer: TokenizerFactory,
        name: str = "shakespeare",
        path: str | None = None,
        mirror: str | None = None,
        cache_dir: str = "~/.cache/lmtrain",
        val_fraction: float = 0.1,
        eval_train: bool = True,
        **windows,
    ):
        super().__init__(cache_dir=cache_dir, mirror=mirror, eval_train=eval_train, **windows)
        self.make_tokenizer = tokenizer
        self.name, self.path, self.val_fraction = name, path, val_fraction

    @cached_property
    def corpus(self) -> Corpus:
        return prepare_corpus(
            name=self.name,
            path=self.path,
            cache_dir=self.cache_dir,
            mirror=self.mirror,
            val_fraction=self.val_fraction,
            block_size=self.block_size,
            make_tokenizer=self.make_tokenizer,
        )

    @property
    def tokenizer(self):
        return self.corpus.tokenizer

    def chars_per_token(self, split: str) -> float:
        return self.corpus.chars_per_token(split)

    def bytes_per_token(self, split: str) -> float:
        return self.corpus.bytes_per_token(split)

    def split_tokens(self, split: str, device: torch.device) -> DeviceTokens:
        ids = self.corpus.train_ids if split == "train" else self.corpus.val_ids
        return DeviceTokens(torch.from_numpy(ids.astype("int32")).to(device))


# tokenizer/ options by the module of their factory, and the kind each writes in a manifest
TOKENIZER_KINDS = {"gpt2": "gpt2", "char": "char", "bpe_train": "bpe", "spm": "sentencepiece"}
HOST_RESIDENT_CPU_BYTES = 256 << 20  # on_device=auto on a CPU: a larger corpus stays mapped (no full read)


class PreparedDataModule(WindowDataModule):
    """The shards of a folder `python -m lmtrain.prepare` wrote; the tokenizer is the manifest's."""

    def __init__(
        self,
        *,
        tokenizer: TokenizerFactory,
        path: str,
        on_device: str | bool = "auto",
        verify: bool = True,
        mirror: str | None = None,
        cache_dir: str = "~/.cache/lmtrain",
        eval_train: bool = True,
        name: str = "prepared",
        val_fraction: float = 0.1,  # chosen by lmtrain.prepare; the manifest's holds
        **windows,
    ):
        super().__init__(cache_dir=cache_dir, mirror=mirror, eval_train=eval_train, **windows)
        self.path, self.on_device, self.verify, self.name = Path(path).expanduser(), on_device, verify, name
        self.configured_tokenizer = tokenizer

    @cached_property
    def prepared(self) -> PreparedCorpus:
        prepared = open_prepared(self.path, verify=self.verify)
        self._check_tokenizer(prepared.manifest["tokenizer"])
        for split in SPLITS:
            if prepared.tokens(split) < self.block_size + 1:
                raise UserError(
                    f"the {split} split of {self.path} has {prepared.tokens(split)} tokens, at least "
                    f"{self.block_size + 1} are needed for block_size={self.block_size}; use a smaller "
                    "model.block_size or a larger corpus"
                )
        return prepared

    def _check_tokenizer(self, written: dict) -> None:
        factory = self.configured_tokenizer
        module = getattr(getattr(factory, "func", factory), "__module__", "").rsplit(".", 1)[-1]
        kind = TOKENIZER_KINDS.get(module, module)
        size = getattr(factory, "keywords", {}).get("vocab_size")
        if kind != written["kind"] or (size is not None and size != written["vocab_size"]):
            wanted = f"tokenizer={written['kind']}" + (
                f" tokenizer.vocab_size={written['vocab_size']}" if written["kind"] in ("bpe", "sentencepiece") else ""
            )
            asked = f"tokenizer={kind}" + (f" with vocab_size={size}" if size is not None else "")
            raise UserError(
                f"{self.path} was prepared with {wanted} ({written['vocab_size']} ids), the config asks for "
                f"{asked}; set {wanted}, or prepare the corpus again with this tokenizer"
            )

    @cached_property
    def tokenizer(self):
        from ..tokenizer import from_state

        return from_state(self.prepared.manifest["tokenizer"]["state"], self.cache_dir, self.mirror)

    def prepare_data(self) -> None:
        _ = self.prepared, self.tokenizer

    def chars_per_token(self, split: str) -> float:
        return self.prepared.stat(split, "characters") / self.prepared.stat(split, "tokens")

    def bytes_per_token(self, split: str) -> float:
        return self.prepared.stat(split, "bytes") / self.prepared.stat(split, "tokens")

    def split_tokens(self, split: str, device: torch.device) -> DeviceTokens | HostTokens:
        shards = self.prepared.shards[split]
        if not self._resident(sum(len(s) for s in shards) * 4, device):
            return HostTokens(shards, device)
        ids = torch.empty(sum(len(s) for s in shards), dtype=torch.int32, device=device)
        offset = 0
        for shard in shards:
            ids[offset : offset + len(shard)].copy_(torch.from_numpy(np.asarray(shard, dtype=np.int32)))
            offset += len(shard)
        return DeviceTokens(ids)

    def _resident(self, nbytes: int, device: torch.device) -> bool:
        if self.on_device != "auto":
            return bool(self.on_device)
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            return nbytes <= free // 4
        return nbytes <= HOST_RESIDENT_CPU_BYTES


def _loader(dataset) -> DataLoader:
    # Batches are made on the device by the dataset itself; the loader's own generator keeps it from
    # drawing on the global RNG when an iterator starts (which would shift dropout after a resume).
    return DataLoader(dataset, batch_size=None, num_workers=0, generator=torch.Generator())
