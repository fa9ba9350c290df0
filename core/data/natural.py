"""Natural images for the CIFAR model zoo: label-free crops of scikit-learn's two photographs, and CIFAR-10/100 read
from a local folder in torchvision's format.

``crops``: random squares cut from the two photographs ``sklearn.datasets.load_sample_images`` ships (china.jpg and
flower.jpg, 427x640 each), drawn by the run seed (each split from its own stream), resized to ``resolution``.
They carry no labels (``y`` is -1 everywhere, ``info.labeled`` is False): they serve label-free uses such as
comparing or stitching networks trained on CIFAR when CIFAR itself is not at hand.

``cifar10`` / ``cifar100``: the python-pickle batches that ``torchvision.datasets.CIFAR10(download=True)`` leaves
(``cifar-10-batches-py/data_batch_1..5, test_batch, batches.meta``; ``cifar-100-python/train, test, meta``). Nothing
downloads. The batches are pickles, so they are read by an unpickler that admits only numpy arrays and plain
containers: a file that names any other global is refused, never executed.

Both standardise with the CIFAR statistics by default (``normalize: cifar``), as the original trained its models.
"""

from __future__ import annotations

import functools
import io
import pickle
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from . import DataBundle, DataContext, DatasetInfo, Split, seeded_split
from .images import packaged_file
from ..errors import UserError
from ..registry import DATASETS
from ..seeds import derive_seed

Normalize = Literal["cifar", "none"]
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)  # the statistics the original stitching code standardised with
CIFAR_STD = (0.2023, 0.1994, 0.2010)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def _normalized(x: torch.Tensor, normalize: str) -> torch.Tensor:
    """uint8 (N, 3, H, W) to float32 in [0, 1], standardised with the CIFAR statistics when asked."""
    x = x.float() / 255
    if normalize == "cifar":
        x = (x - torch.tensor(CIFAR_MEAN)[:, None, None]) / torch.tensor(CIFAR_STD)[:, None, None]
    return x


# ----------------------------------------------------------------------------------------------------- crops

@functools.lru_cache(maxsize=1)
def _photographs() -> torch.Tensor:
    """The two photographs, uint8 (2, 3, 427, 640); decoded once per process (callers must not modify them)."""
    from PIL import Image

    images = []
    for name in ("china.jpg", "flower.jpg"):  # load_sample_images' order (sorted file names)
        with Image.open(packaged_file("crops", "sklearn", "datasets", "images", name)) as image:
            images.append(torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1))
    return torch.stack(images)


def draw_crops(photos: torch.Tensor, n: int, crop_size: int, resolution: int, generator: torch.Generator
               ) -> torch.Tensor:
    """``n`` uint8 crops (n, 3, resolution, resolution): a photograph and a position drawn uniformly per crop."""
    count, _, height, width = photos.shape
    which = torch.randint(count, (n,), generator=generator)
    tops = torch.randint(height - crop_size + 1, (n,), generator=generator)
    lefts = torch.randint(width - crop_size + 1, (n,), generator=generator)
    crops = torch.stack([photos[p, :, t:t + crop_size, l:l + crop_size]
                         for p, t, l in zip(which.tolist(), tops.tolist(), lefts.tolist())])
    if crop_size != resolution:
        resized = F.interpolate(crops.float(), size=(resolution, resolution), mode="bilinear", antialias=True,
                                align_corners=False)
        crops = resized.round().clamp(0, 255).to(torch.uint8)
    return crops


@DATASETS.register("crops")
def crops(ctx: DataContext, *, n_train: Annotated[int, Field(ge=1)] = 4096,
          n_val: Annotated[int, Field(ge=1)] = 1024, n_test: Annotated[int, Field(ge=1)] = 1024,
          crop_size: Annotated[int, Field(ge=4, le=427)] = 32, resolution: Annotated[int, Field(ge=4, le=512)] = 32,
          num_classes: Annotated[int, Field(ge=1)] = 10, normalize: Normalize = "cifar") -> DataBundle:
    """Label-free natural images: random ``crop_size`` squares of scikit-learn's two photographs, resized to
    ``resolution``. ``num_classes`` is the class count of the models that will see them (the crops have no labels:
    ``y`` is -1)."""
    photos = _photographs()
    splits = {}
    for offset, (name, n) in enumerate((("train", n_train), ("val", n_val), ("test", n_test))):
        generator = torch.Generator().manual_seed(derive_seed(ctx.seed, offset, legacy="offset"))
        x = _normalized(draw_crops(photos, n, crop_size, resolution, generator), normalize)
        splits[name] = Split(x, torch.full((n,), -1, dtype=torch.long))
    info = DatasetInfo((3, resolution, resolution), num_classes=num_classes, labeled=False)
    return DataBundle(splits["train"], splits["val"], splits["test"], info)


# ----------------------------------------------------------------------------------------------------- CIFAR

class _ArraysOnly(pickle.Unpickler):
    """An unpickler for the CIFAR batches: numpy arrays, dicts, lists, strings and numbers, nothing else."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
               ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused global {module}.{name}")
        return super().find_class(module, name)


def read_batch(path: Path) -> dict:
    """One CIFAR pickle batch as a dict with str keys; a UserError for anything that is not such a batch."""
    try:
        raw = _ArraysOnly(io.BytesIO(path.read_bytes()), encoding="latin1").load()
    except FileNotFoundError:
        raise UserError(f"{path}: CIFAR batch file not found") from None
    except Exception as err:  # truncated, foreign or hostile: refuse it, whatever the unpickler tripped on
        raise UserError(f"{path}: not a CIFAR batch in torchvision's format ({err.__class__.__name__}: "
                        f"{str(err)[:120]})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: not a CIFAR batch (a {type(raw).__name__}, expected a dict)")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in raw.items()}


def _images_and_labels(path: Path, label_key: str) -> tuple[torch.Tensor, torch.Tensor]:
    batch = read_batch(path)
    data, labels = batch.get("data"), batch.get(label_key)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise UserError(f"{path}: 'data' is not a uint8 array of N x 3072 pixels")
    if not isinstance(labels, (list, np.ndarray)) or len(labels) != len(data):
        raise UserError(f"{path}: {label_key!r} is not a list of {len(data)} labels")
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.as_tensor(np.asarray(labels), dtype=torch.long)


def _cifar_folder(root: str, folder: str) -> Path:
    path = Path(root).expanduser()
    if path.name != folder:
        path = path / folder
    if not path.is_dir():
        raise UserError(f"CIFAR folder {path} not found (expected torchvision's layout: {root}/{folder}/; nothing "
                        f"is downloaded)")
    return path


def _cifar_bundle(train: list[Path], test: Path, label_key: str, num_classes: int, class_names: list[str],
                  ctx: DataContext, val_fraction: float, limit: int | None, normalize: str) -> DataBundle:
    parts = [_images_and_labels(p, label_key) for p in train]
    x, y = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    x_test, y_test = _images_and_labels(test, label_key)
    for labels, path in ((y, train[0].parent), (y_test, test)):
        if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
            raise UserError(f"{path}: labels outside 0..{num_classes - 1}")
    keep, val, _ = seeded_split(len(y), (val_fraction, 0.0), ctx.seed)
    if limit is not None:
        keep = keep[:limit]
    info = DatasetInfo((3, 32, 32), num_classes=num_classes, class_names=class_names)
    return DataBundle(Split(_normalized(x[keep], normalize), y[keep]), Split(_normalized(x[val], normalize), y[val]),
                      Split(_normalized(x_test, normalize), y_test), info)


@DATASETS.register("cifar10")
def cifar10(ctx: DataContext, *, root: str, val_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.1,
            limit: Annotated[int, Field(ge=1)] | None = None, normalize: Normalize = "cifar") -> DataBundle:
    """CIFAR-10 from ``root`` (the folder holding ``cifar-10-batches-py``, or that folder): the five training batches
    (``val_fraction`` of them split off by the seed as val; ``limit`` caps the rest) and ``test_batch`` as test."""
    folder = _cifar_folder(root, "cifar-10-batches-py")
    train = [folder / f"data_batch_{i}" for i in range(1, 6)]
    return _cifar_bundle(train, folder / "test_batch", "labels", 10, list(CIFAR10_CLASSES), ctx, val_fraction, limit,
                         normalize)


@DATASETS.register("cifar100")
def cifar100(ctx: DataContext, *, root: str, labels: Literal["fine", "coarse"] = "fine",
             val_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.1,
             limit: Annotated[int, Field(ge=1)] | None = None, normalize: Normalize = "cifar") -> DataBundle:
    """CIFAR-100 from ``root`` (the folder holding ``cifar-100-python``, or that folder): 100 fine or 20 coarse
    classes; ``train`` split by the seed into train and val, ``test`` as test."""
    folder = _cifar_folder(root, "cifar-100-python")
    count = 100 if labels == "fine" else 20
    names = [str(i) for i in range(count)]
    meta_path = folder / "meta"
    if meta_path.is_file():
        meta = read_batch(meta_path).get(f"{labels}_label_names")
        if isinstance(meta, list) and len(meta) == count:
            names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta]
    return _cifar_bundle([folder / "train"], folder / "test", f"{labels}_labels", count, names, ctx, val_fraction,
                         limit, normalize)
