"""Datasets as in-memory tensors or streamed map-style datasets, and the one batch loader every stage uses.

A split that fits in memory is a ``Split`` of tensors (inputs, targets): batches are slices of a seeded
permutation, with no worker processes, no per-item Python, and the same order on every replay. Data that do not
fit are a ``StreamSplit``: a map-style ``torch.utils.data.Dataset`` read by a ``DataLoader`` with worker processes,
in the very same seeded order of indices, so that a stream is seeded, sharded under DDP and resumable exactly like
the in-memory path (a resumed epoch starts at its next batch without reading the ones before). Image folders
stream.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch.utils.data import DistributedSampler

from ..seeds import derive_seed
from ..dataset_info import DatasetInfo, Modality

__all__ = ["BatchLoader", "DataBundle", "DataContext", "DatasetInfo", "Modality", "Split", "StreamSplit", "batches",
           "seeded_split"]


@dataclass
class DataContext:
    """What a dataset builder receives from the run besides its config keys."""

    seed: int
    cache_dir: str = ".cache/instill"


@dataclass
class Split:
    """One split held as tensors: ``stored`` inputs and ``y`` targets share their first (sample) dimension.

    ``transform`` (optional) turns stored inputs into what the model sees, batch by batch as they are read: image
    folders keep their pixels as uint8 in memory, a quarter of float32 (20,000 images at 224 px are 3 GB, not 12).
    It must act on each sample alone (an elementwise conversion), so that a batch is bit for bit those rows of the
    whole converted tensor.
    """

    stored: torch.Tensor
    y: torch.Tensor
    transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None

    def __len__(self) -> int:
        return len(self.y)

    @property
    def x(self) -> torch.Tensor:
        """Every input as the model sees it (converted now, in full, when there is a ``transform``)."""
        return self.inputs(slice(None))

    def subset(self, index: torch.Tensor) -> "Split":
        return Split(self.stored[index], self.y[index], self.transform)

    def head(self, n: int) -> torch.Tensor:
        """The first ``n`` inputs (a probe batch)."""
        return self.inputs(slice(0, n))

    def inputs(self, index: torch.Tensor | slice) -> torch.Tensor:
        """The inputs at ``index`` (int64 positions or a slice), stacked."""
        stored = self.stored[index]
        return stored if self.transform is None else self.transform(stored)


@dataclass
class StreamSplit:
    """One split read item by item from a map-style Dataset whose items are ``(input, target)``.

    ``y`` holds every target up front (labels are cheap; evaluation and class counts read them); ``workers`` is the
    DataLoader's ``num_workers``. ``inputs`` reads the items asked for; ``x`` decodes every item (small sets and
    tests only: no stage reads it).

    Random transforms inside a dataset draw from each worker's generators, seeded from the run: a run replays
    exactly, but an epoch resumed in the middle hands its batches to the workers in another order, so with
    ``workers > 0`` only deterministic items resume bit for bit (image folders' are).
    """

    dataset: Any
    y: torch.Tensor
    workers: int = 0

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, index: torch.Tensor) -> "StreamSplit":
        from torch.utils.data import Subset

        return StreamSplit(Subset(self.dataset, index.tolist()), self.y[index], self.workers)

    def head(self, n: int) -> torch.Tensor:
        """The first ``n`` inputs, read now (a probe batch)."""
        return self.inputs(torch.arange(min(n, len(self))))

    def inputs(self, index: torch.Tensor) -> torch.Tensor:
        """The inputs at ``index`` (int64 positions), read now, one item at a time: only those are decoded."""
        return torch.stack([self.dataset[i][0] for i in index.tolist()])

    @property
    def x(self) -> torch.Tensor:
        return self.head(len(self))

    def batches(self, index_batches: list[list[int]], seed: int = 0):
        """(inputs, targets) for each list of indices, in order, read by ``workers`` processes."""
        from torch.utils.data import DataLoader

        if not index_batches:
            return iter(())
        loader = DataLoader(self.dataset, batch_sampler=index_batches, num_workers=self.workers,
                            worker_init_fn=_seed_worker if self.workers else None,
                            generator=torch.Generator().manual_seed(seed))
        return _one_line_errors(iter(loader))


def _one_line_errors(batches):
    """A UserError raised in a worker process comes back wrapped in its traceback: keep its own line."""
    from ..errors import UserError

    try:
        yield from batches
    except UserError as err:
        lines = str(err).strip().splitlines()
        last = lines[-1] if lines else ""
        raise UserError(last.split("UserError: ", 1)[-1]) from None


def _seed_worker(worker_id: int) -> None:
    """Each worker's Python and NumPy generators from torch's per-worker seed (itself from the loader's generator),
    so random transforms in a dataset replay exactly."""
    import random

    import numpy as np

    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def batches(split: "Split | StreamSplit", batch_size: int):
    """The split's (inputs, targets) in order, ``batch_size`` at a time (evaluation)."""
    if isinstance(split, StreamSplit):
        yield from split.batches([list(range(i, min(i + batch_size, len(split))))
                                  for i in range(0, len(split), batch_size)])
        return
    for start in range(0, len(split), batch_size):
        yield split.inputs(slice(start, start + batch_size)), split.y[start:start + batch_size]


@dataclass
class DataBundle:
    """train / val / test splits, any further named evaluation sets, and what the data provide (``info``).

    ``info`` is a ``DatasetInfo``; a plain mapping of its attribute names (a user's builder may give one) is
    turned into one here, and a UserError names what does not fit.
    """

    train: Split
    val: Split
    test: Split
    info: DatasetInfo
    extra_eval: dict[str, Split] = field(default_factory=dict)

    def __post_init__(self):
        self.info = DatasetInfo.of(self.info)

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
        return (batch for _, batch in self.iter_from(0))

    def iter_from(self, start: int):
        """``(i, batch)`` for the epoch's batches from batch ``start`` on (a resumed epoch reads no earlier one)."""
        order = self._indices()
        spans = [order[i * self.batch_size : (i + 1) * self.batch_size] for i in range(start, len(self))]
        if isinstance(self.split, StreamSplit):
            seed = derive_seed(self.seed, self.epoch, legacy="epoch")
            stream = self.split.batches([span.tolist() for span in spans], seed=seed)
            yield from enumerate(stream, start)
            return
        for i, index in enumerate(spans, start):
            yield i, (self.split.inputs(index), self.split.y[index])
