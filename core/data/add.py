"""The Add task of Boopathy & Fiete (2022): y_t = 0.5 + 0.5 x_{t-t1} - 0.25 x_{t-t2} for Bernoulli(0.5) inputs.

``add_task`` zeroes the first t1 (t2) *time steps* of the shifted copies, so every target depends on past inputs
only. ``legacy_add_data`` keeps the original generator, which zeroes the first t1 (t2) *sequences* instead
(``roll[:t] = 0`` for ``roll[:, :t] = 0``): for most sequences the early targets wrap around ``np.roll`` and depend
on the sequence's last, future inputs. Inputs (N, T) floats in {0, 1}; targets (N, T) floats; 300 train / 100 test
sequences drawn with seed 99 as the original, plus a validation set of its own (``val`` sequences, drawn after).
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import conint

from . import DataBundle, DataContext, DatasetInfo, Split
from ..errors import UserError
from ..registry import DATASETS


def add_sequences(n: int, length: int, t1: int, t2: int, seed: int, legacy: bool = False
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) of ``n`` Add-task sequences of ``length`` steps (the original's draw for seed 99)."""
    if max(t1, t2) >= length:
        raise UserError(f"data: lags t1={t1}, t2={t2} must be shorter than the sequence length {length}")
    x = np.random.RandomState(seed).binomial(1, 0.5, size=(n, length))
    shifted = []
    for lag in (t1, t2):
        rolled = np.roll(x, lag, axis=1)
        if legacy:
            rolled[:lag] = 0  # the original's bug: rows (sequences), not columns (time steps)
        else:
            rolled[:, :lag] = 0
        shifted.append(rolled)
    return x, 0.5 + 0.5 * shifted[0] - 0.25 * shifted[1]


def _bundle(ctx: DataContext, train: int, test: int, val: int, length: int, t1: int, t2: int, data_seed: int,
            legacy: bool) -> DataBundle:
    x, y = add_sequences(train + test + val, length, t1, t2, data_seed, legacy)
    x, y = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.float32)
    cut = lambda a, b: Split(x[a:b], y[a:b])  # noqa: E731
    return DataBundle(train=cut(0, train), test=cut(train, train + test), val=cut(train + test, train + test + val),
                      info=DatasetInfo((length,), num_outputs=length, regression=True))


@DATASETS.register("add_task")
def add_task(ctx: DataContext, *, train: conint(ge=1) = 300, test: conint(ge=1) = 100, val: conint(ge=1) = 100,
             length: conint(ge=2) = 100, t1: conint(ge=0) = 2, t2: conint(ge=0) = 5, data_seed: int = 99
             ) -> DataBundle:
    """The Add task with targets that depend on past inputs only."""
    return _bundle(ctx, train, test, val, length, t1, t2, data_seed, legacy=False)


@DATASETS.register("legacy_add_data")
def legacy_add_data(ctx: DataContext, *, train: conint(ge=1) = 300, test: conint(ge=1) = 100,
                    val: conint(ge=1) = 100, length: conint(ge=2) = 100, t1: conint(ge=0) = 2, t2: conint(ge=0) = 5,
                    data_seed: int = 99) -> DataBundle:
    """The original's Add-task generator, bug included (early targets of most sequences see future inputs)."""
    return _bundle(ctx, train, test, val, length, t1, t2, data_seed, legacy=True)
