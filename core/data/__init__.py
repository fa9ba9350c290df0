"""Datasets as in-memory tensors, and the one batch loader every stage uses.

Every dataset instill ships fits in memory, so a split is a tuple of tensors (inputs, targets) and batches are
slices of a seeded permutation: no worker processes, no per-item Python, and the same order on every replay.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DistributedSampler

from ..run import derive_seed


@dataclass
class DataContext:
    """What a dataset builder receives from the run besides its config keys."""

    seed: int
    cache_dir: str = ".cache/instill"


@dataclass
class Split:
    """One split held as tensors. ``x`` and ``y`` share their first (sample) dimension."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, index: torch.Tensor) -> "Split":
        return Split(self.x[index], self.y[index])


@dataclass
class DataBundle:
    """train / val / test splits, any further named evaluation sets, and facts a model builder needs.

    ``info`` holds at least ``input_shape`` (per sample) and ``num_classes`` (or ``vocab_size`` for sequences).
    """

    train: Split
    val: Split
    test: Split
    info: dict[str, Any]
    extra_eval: dict[str, Split] = field(default_factory=dict)

    def eval_sets(self) -> dict[str, Split]:
        return {"val": self.val, "test": self.test, **self.extra_eval}


def seeded_split(n: int, fractions: tuple[float, float], seed: int) -> tuple[torch.Tensor, ...]:
    """Indices of a shuffled train/val/test split of ``n`` items; ``fractions`` are (val, test)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val, n_test = (int(round(f * n)) for f in fractions)
    return perm[n_val + n_test :], perm[:n_val], perm[n_val : n_val + n_test]


class BatchLoader:
    """Seeded shuffled mini-batches over a Split; under DDP each rank takes an equal, disjoint share.

    The epoch's permutation depends only on (seed, epoch), so a resumed run sees the very batches an uninterrupted
    run would have seen. Under torchrun, ``torch.utils.data.DistributedSampler`` shards that very permutation (it
    draws ``randperm(n)`` from the seed it is given, which is the epoch's seed here): rank r takes every
    world_size-th index from position r, and the last n mod world_size indices are left out so that every rank
    runs the same number of steps.
    """

    def __init__(self, split: Split, batch_size: int, *, shuffle: bool, seed: int = 0, rank: int = 0,
                 world_size: int = 1, drop_last: bool = False):
        self.split, self.batch_size, self.shuffle, self.seed = split, batch_size, shuffle, seed
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self) -> torch.Tensor:
        n, seed = len(self.split), derive_seed(self.seed, self.epoch, legacy="epoch")
        if self.world_size > 1:
            sampler = DistributedSampler(self.split, num_replicas=self.world_size, rank=self.rank,
                                         shuffle=self.shuffle, seed=seed, drop_last=True)
            return torch.tensor(list(sampler), dtype=torch.long)
        if self.shuffle:
            return torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        return torch.arange(n)

    def __len__(self) -> int:
        n = len(self.split) // self.world_size
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        order = self._indices()
        for i in range(len(self)):
            index = order[i * self.batch_size : (i + 1) * self.batch_size]
            yield self.split.x[index], self.split.y[index]
