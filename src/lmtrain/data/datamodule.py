"""The LightningDataModule: tokenize once (cached), keep the ids on the device, serve random windows."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

from .corpus import Corpus, TokenizerFactory, prepare_corpus
from .windows import FixedWindows, RandomWindows, full_pass_starts, random_starts


class TextDataModule(L.LightningDataModule):
    def __init__(
        self,
        *,
        tokenizer: TokenizerFactory,
        block_size: int,
        batch_size: int,
        train_batches: int,
        eval_batches: int | None,
        seed: int,
        eval_train: bool = True,
        name: str = "shakespeare",
        path: str | None = None,
        mirror: str | None = None,
        cache_dir: str = "~/.cache/lmtrain",
        val_fraction: float = 0.1,
    ):
        super().__init__()
        self.make_tokenizer = tokenizer
        self.block_size, self.batch_size, self.seed = block_size, batch_size, seed
        self.train_batches = train_batches  # micro-batches in the whole run
        self.eval_batches = eval_batches  # None: one full pass over the split
        self.eval_train = eval_train  # the training split is evaluated after the validation split
        self.name, self.path, self.val_fraction = name, path, val_fraction
        self.mirror = Path(mirror).expanduser() if mirror else None
        self.cache_dir = Path(cache_dir).expanduser()
        self._device_ids: dict[str, torch.Tensor] = {}

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

    def prepare_data(self) -> None:
        """Download, build the tokenizer and write the id cache, once, on one process."""
        _ = self.corpus

    def setup(self, stage: str) -> None:
        if self._device_ids:
            return
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        for split, ids in (("train", self.corpus.train_ids), ("val", self.corpus.val_ids)):
            self._device_ids[split] = torch.from_numpy(ids.astype("int32")).to(device)

    def _rank_and_world(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def _first_batch(self) -> int:
        return self.trainer.global_step * self.trainer.accumulate_grad_batches if self.trainer else 0

    def train_dataloader(self) -> DataLoader:
        rank, world = self._rank_and_world()
        windows = RandomWindows(
            self._device_ids["train"],
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
        ids = self._device_ids[split]
        rank, world = self._rank_and_world()
        size = self.batch_size * world
        if self.eval_batches is None:
            starts = full_pass_starts(len(ids), self.block_size, size)
        else:
            starts = random_starts(len(ids), self.block_size, size, self.eval_batches, self.seed + 1)
        mine = [s[rank * self.batch_size : (rank + 1) * self.batch_size] for s in starts]
        return FixedWindows(ids, [s.to(ids.device) for s in mine if len(s)], self.block_size)

    def val_dataloader(self) -> list[DataLoader]:
        splits = ("val", "train") if self.eval_train else ("val",)
        return [_loader(self.eval_windows(split)) for split in splits]


def _loader(dataset) -> DataLoader:
    # Batches are made on the device by the dataset itself; the loader's own generator keeps it from
    # drawing on the global RNG when an iterator starts (which would shift dropout after a resume).
    return DataLoader(dataset, batch_size=None, num_workers=0, generator=torch.Generator())
