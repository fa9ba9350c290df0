"""Datasets as in-memory tensors or streamed map-style datasets, and the one batch loader every stage uses.

A split that fits in memory is a ``Split`` of tensors (inputs, targets): batches are slices of a seeded
permutation, with no worker processes, no per-item Python, and the same order on every replay. Data that do not
fit are a ``StreamSplit``: a map-style ``torch.utils.data.Dataset`` read by a ``DataLoader`` with worker processes,
in the very same seeded order of indices, so that a stream is seeded, sharded under DDP and resumable exactly like
the in-memory path (a resumed epoch starts at its next batch without reading the ones before). Image folders
stream. Between the two, a ``FillingSplit`` reads each row through the workers the first time a batch needs it and
keeps it in memory: the first epoch streams, the later ones index memory (an image folder with ``stream: false``).
Every kind gives its batches through ``batches(index_batches, seed)``, which ``BatchLoader`` calls.
"""

from __future__ import annotations

import collections
import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch.utils.data import DistributedSampler

from ..seeds import derive_seed
from ..dataset_info import DatasetInfo, Modality

__all__ = ["BatchLoader", "DataBundle", "DataContext", "DatasetInfo", "FillingSplit", "Modality", "RowStore", "Split",
           "StreamSplit", "batches", "seeded_split"]


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
    whole converted tensor. ``workers`` threads then make the next batches' inputs ahead (image folders: the
    config's ``workers``), as a DataLoader's worker processes would, without copies between processes.
    """

    stored: torch.Tensor
    y: torch.Tensor
    transform: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    workers: int = 0

    def __len__(self) -> int:
        return len(self.y)

    @property
    def x(self) -> torch.Tensor:
        """Every input as the model sees it (converted now, in full, when there is a ``transform``)."""
        return self.inputs(slice(None))

    def subset(self, index: torch.Tensor) -> "Split":
        return Split(self.stored[index], self.y[index], self.transform, self.workers)

    def head(self, n: int) -> torch.Tensor:
        """The first ``n`` inputs (a probe batch)."""
        return self.inputs(slice(0, n))

    def inputs(self, index: torch.Tensor | slice) -> torch.Tensor:
        """The inputs at ``index`` (int64 positions or a slice), stacked."""
        stored = self.stored[index] if isinstance(index, slice) else self.stored.index_select(0, index)
        return stored if self.transform is None else self.transform(stored)

    def batches(self, index_batches: list, seed: int = 0):
        """(inputs, targets) for each batch of positions (a list, an int64 tensor or a slice), in order."""
        return _held_batches(self, map(_positions, index_batches), self.workers)


class FillingSplit:
    """A ``Split`` whose stored rows are made the first time a batch needs them and held from then on: the first
    epoch streams (``workers`` DataLoader processes read the rows its batches lack, in the epoch's order, while
    training consumes them), later epochs index memory. Reading a never-read row costs its first reader only.

    ``store`` (a ``RowStore``) holds the rows of the whole source; splits taken from it (``subset``) share it and
    differ in ``rows``, the store rows they see. Batches are bit for bit those of a ``Split`` of the filled tensor.
    """

    def __init__(self, store: "RowStore", y: torch.Tensor, transform: Optional[Callable] = None,
                 rows: Optional[torch.Tensor] = None):
        self.store, self.y, self.transform = store, y, transform
        self.rows = torch.arange(len(y)) if rows is None else rows

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, index: torch.Tensor) -> "FillingSplit":
        return FillingSplit(self.store, self.y[index], self.transform, self.rows[index])

    @property
    def stored(self) -> torch.Tensor:
        """Every stored row of this split (read now where missing)."""
        return self._stored(self.rows)

    @property
    def x(self) -> torch.Tensor:
        return self.inputs(slice(None))

    def head(self, n: int) -> torch.Tensor:
        return self.inputs(slice(0, n))

    def inputs(self, index: torch.Tensor | slice) -> torch.Tensor:
        stored = self._stored(self.rows[index])
        return stored if self.transform is None else self.transform(stored)

    def batches(self, index_batches: list, seed: int = 0):
        """(inputs, targets) for each batch of positions (a list, an int64 tensor or a slice), in order; the rows none
        has read yet are read by the store's workers, which also make a wholly new batch's inputs (the transform runs
        beside the training process, as a streamed reader's does, not in it)."""
        index_batches = [_positions(index) for index in index_batches]
        missing = [self.store.missing(self.rows[index]) for index in index_batches]
        if not any(len(rows) for rows in missing):  # every row in memory: as a Split's batches
            yield from _held_batches(self, index_batches, self.store.workers)
            return
        made = self.store.read([rows for rows in missing if len(rows)], self.transform)
        for index, rows in zip(index_batches, missing):
            if len(rows):
                stored, inputs = next(made)
                self.store.put(rows, stored)
                if len(rows) == len(self.y[index]):
                    yield (stored if inputs is None else inputs), self.y[index]
                    continue
            stored = self.store.rows.index_select(0, self.rows[index])
            yield (stored if self.transform is None else self.transform(stored)), self.y[index]

    def _stored(self, rows: torch.Tensor) -> torch.Tensor:
        missing = self.store.missing(rows)
        if len(missing):
            self.store.put(missing, next(self.store.read([missing]))[0])
        return self.store.rows.index_select(0, rows)


class RowStore:
    """The rows of a map-style ``source`` (item i: row i, a tensor of ``shape`` and ``dtype``), made on demand by
    ``workers`` DataLoader processes and kept. ``when_full`` receives the whole tensor once every row is in (the data
    cache writes it); rows never change afterwards.

    Workers send the rows they make and this process puts them in place. Workers writing straight into a store in
    shared memory was tried and was slower (its pages are faulted in through one tmpfs file: first epochs of 28.9 and
    32.7 s against 27.2 and 28.2 s, 20,000 files at 224 px, alternating in one process).
    """

    def __init__(self, source: Any, shape: tuple[int, ...], dtype: torch.dtype, *, workers: int = 0,
                 when_full: Optional[Callable[[torch.Tensor], None]] = None):
        self.source, self.workers, self.when_full = source, workers, when_full
        self.rows = torch.empty(len(source), *shape, dtype=dtype)  # pages are only touched as rows are filled
        self.filled = torch.zeros(len(source), dtype=torch.bool)

    def missing(self, rows: torch.Tensor) -> torch.Tensor:
        """The rows among ``rows`` not made yet."""
        return rows[~self.filled[rows]]

    def read(self, row_lists: list[torch.Tensor], transform: Optional[Callable] = None):
        """Per list of rows, in order, made by the workers: (the rows stacked, ``transform`` of them or None)."""
        from torch.utils.data import DataLoader

        if not row_lists:
            return iter(())
        loader = DataLoader(self.source, batch_sampler=[rows.tolist() for rows in row_lists],
                            num_workers=self.workers, collate_fn=_MadeInWorker(transform),
                            generator=torch.Generator())  # leaves torch's global generator alone
        return _one_line_errors(iter(loader))

    def put(self, rows: torch.Tensor, values: torch.Tensor) -> None:
        for row, value in zip(rows.tolist(), values):  # a copy per row: index_put_ took twice as long for images
            self.rows[row].copy_(value)
        was_full = bool(self.filled.all())
        self.filled[rows] = True
        if not was_full and self.when_full is not None and bool(self.filled.all()):
            self.when_full(self.rows)


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

    def batches(self, index_batches: list, seed: int = 0):
        """(inputs, targets) for each batch of positions (a list, an int64 tensor or a slice), in order, read by
        ``workers`` processes."""
        from torch.utils.data import DataLoader

        if not index_batches:
            return iter(())
        positions = torch.arange(len(self))
        index_batches = [positions[_positions(index)].tolist() for index in index_batches]
        loader = DataLoader(self.dataset, batch_sampler=index_batches, num_workers=self.workers,
                            worker_init_fn=_seed_worker if self.workers else None,
                            generator=torch.Generator().manual_seed(seed))
        return _one_line_errors(iter(loader))


class _MadeInWorker:
    """A worker's batch: the items stacked (torch's collate: in a worker, straight into the shared memory that carries
    the batch over) and ``transform`` of them (or None)."""

    def __init__(self, transform: Optional[Callable]):
        self.transform = transform

    def __call__(self, items: list) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        from torch.utils.data import default_collate

        stored = default_collate(items)
        return stored, (None if self.transform is None else self.transform(stored))


def batch_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An empty tensor for a batch; in a DataLoader worker, in shared memory, which then carries it to the training
    process as it is (torch's collate allocates its batches so). A tensor made in ordinary memory is copied into
    shared memory when the worker sends it: a float32 batch of 256 images at 224 px took 314 ms made so against 197 ms
    written in place."""
    from torch.utils.data import get_worker_info

    if get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    numel = math.prod(shape)
    storage = torch.UntypedStorage._new_shared(numel * dtype.itemsize)
    return torch.empty(0, dtype=dtype).set_(storage, 0, shape)


def _held_batches(split: "Split | FillingSplit", index_batches: Any, workers: int):
    """(inputs, targets) of an in-memory split's batches; with a transform, ``workers`` threads make them ahead."""
    return _made_ahead(lambda index: (split.inputs(index), split.y[index]), index_batches,
                       workers if split.transform is not None else 0)


def _made_ahead(make: Callable[[Any], Any], items: Any, threads: int):
    """``make(item)`` for each item, in order; with ``threads``, that many threads make the next ones ahead (torch's
    kernels release the interpreter's lock, so gathering and converting batches runs on the cores a DataLoader's
    workers would use). At most two per thread wait made, as a DataLoader's prefetch."""
    if threads <= 0:
        yield from map(make, items)
        return
    from concurrent.futures import ThreadPoolExecutor

    items = iter(items)
    with ThreadPoolExecutor(threads, thread_name_prefix="instill-batches") as pool:
        pending = collections.deque(pool.submit(make, item) for item in itertools.islice(items, 2 * threads))
        while pending:
            made = pending.popleft().result()
            pending.extend(pool.submit(make, item) for item in itertools.islice(items, 1))
            yield made


def _positions(index: Any) -> torch.Tensor | slice:
    """A batch's positions as a split indexes with them: a slice stays one (a view, no copy), the rest int64."""
    return index if isinstance(index, slice) else torch.as_tensor(index, dtype=torch.long)


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
    yield from split.batches([slice(i, i + batch_size) for i in range(0, len(split), batch_size)])


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
        yield from enumerate(self.split.batches(spans, seed=derive_seed(self.seed, self.epoch, legacy="epoch")), start)
