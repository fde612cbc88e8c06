"""Batches of (x, y) windows of token ids: sliced on the device from ids resident there, or gathered from
memory-mapped shards on the host into pinned memory and copied without waiting. No host sync per step."""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import numpy as np
import torch
from torch.utils.data import IterableDataset


def slice_windows(ids: torch.Tensor, starts: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x = ids[s : s+T] and y = ids[s+1 : s+T+1] for each start s: two (B, T) int64 tensors."""
    offsets = torch.arange(block_size + 1, device=ids.device)
    windows = ids[starts[:, None] + offsets].long()  # (B, T+1)
    return windows[:, :-1], windows[:, 1:]


class DeviceTokens:
    """Ids resident on the device (int32); window starts are drawn there too."""

    def __init__(self, ids: torch.Tensor):
        self.ids, self.device = ids, ids.device

    def __len__(self) -> int:
        return len(self.ids)

    def windows(self, starts: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        return slice_windows(self.ids, starts, block_size)


class HostTokens:
    """The concatenation of memory-mapped shards, left on the host; window starts are drawn on the CPU.

    A batch is gathered into pinned memory and copied to `target` asynchronously (the caching host allocator
    keeps the buffer until the copy is done), so the host prepares the next batch while the device computes.
    """

    def __init__(self, shards: list[np.ndarray], target: torch.device):
        self.shards = [s for s in shards if len(s)]
        self.offsets = np.cumsum([0, *(len(s) for s in self.shards)])
        self.device, self.target = torch.device("cpu"), target

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def windows(self, starts: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        span = block_size + 1
        pinned = self.target.type == "cuda"
        batch = torch.empty((len(starts), span), dtype=torch.int32, pin_memory=pinned)
        rows = batch.numpy()
        for row, start in zip(rows, starts.tolist()):
            self._gather(start, row)
        windows = batch.to(self.target, non_blocking=pinned).long()  # (B, T+1)
        return windows[:, :-1], windows[:, 1:]

    def _gather(self, start: int, row: np.ndarray) -> None:
        """row[:] = ids[start : start + len(row)] across shard ends."""
        shard = int(np.searchsorted(self.offsets, start, side="right")) - 1
        filled, position = 0, start - int(self.offsets[shard])
        while filled < len(row):
            part = self.shards[shard][position : position + len(row) - filled]
            row[filled : filled + len(part)] = part
            filled, shard, position = filled + len(part), shard + 1, 0


def batch_seed(seed: int, index: int) -> int:
    digest = hashlib.blake2b(f"{seed}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class RandomWindows(IterableDataset):
    """Micro-batch i: world_size x batch_size random windows drawn from a generator seeded by (seed, i);
    each rank takes its own batch_size of them.

    A batch is a function of its index alone, so resuming at optimizer step s continues exactly with
    micro-batch s * accumulate_grad_batches: the data position needs no state of its own. And the ranks
    together see what one process with the whole batch would: 1 or 8 devices follow the same path.
    """

    def __init__(
        self,
        tokens: DeviceTokens | HostTokens,
        block_size: int,
        batch_size: int,
        seed: int,
        num_batches: int,
        first_batch: Callable[[], int],
        rank: int = 0,
        world_size: int = 1,
    ):
        self.tokens, self.block_size, self.batch_size = tokens, block_size, batch_size
        self.seed, self.num_batches, self.first_batch = seed, num_batches, first_batch
        self.rank, self.world_size = rank, world_size
        self.generator = torch.Generator(device=tokens.device)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self):
        for index in range(self.first_batch(), self.num_batches):
            yield self.batch(index)

    def batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.generator.manual_seed(batch_seed(self.seed, index))
        high = len(self.tokens) - self.block_size
        starts = torch.randint(
            high, (self.world_size, self.batch_size), device=self.tokens.device, generator=self.generator
        )
        return self.tokens.windows(starts[self.rank], self.block_size)


class FixedWindows(IterableDataset):
    """Evaluation batches at fixed starts (n_batches, B): the same windows at every evaluation."""

    def __init__(self, tokens: DeviceTokens | HostTokens, starts: list[torch.Tensor], block_size: int):
        self.tokens, self.block_size = tokens, block_size
        self.starts = [s.to(tokens.device) for s in starts]

    def __len__(self) -> int:
        return len(self.starts)

    def __iter__(self):
        for starts in self.starts:
            yield self.tokens.windows(starts, self.block_size)


def random_starts(n_tokens: int, block_size: int, batch_size: int, n_batches: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(n_tokens - block_size, (n_batches, batch_size), generator=generator)
    return list(starts)


def full_pass_starts(n_tokens: int, block_size: int, batch_size: int) -> list[torch.Tensor]:
    """Consecutive non-overlapping windows covering the split once (the tail shorter than a window is left)."""
    starts = torch.arange(0, n_tokens - block_size, block_size)
    return list(starts.split(batch_size))
