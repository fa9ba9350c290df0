"""Real images from folders: the ``ImageFolder`` layout, and the cue-conflict stimuli of Geirhos et al. (2019).

``root/<class name>/<image>``: class ids follow the sorted class names (never the file system's listing order, which
made the original code's labels non-portable). Every image is decoded with PIL, its shorter side resized to the
configured resolution and centre-cropped to a square. By default the folders stream: an image is decoded when a batch
needs it (``FolderImages``), never all up front; with ``stream: false`` (and for the cue-conflict stimuli) all of them
are held in memory as one uint8 tensor, cached under the run's cache_dir, keyed by the file listing, sizes and
modification times. Without a cached copy, ``stream: false`` decodes each image when the first epoch's batches need it
(that epoch streams, ``FillingSplit``) and writes the cache once every image is in.

Cue-conflict stimuli (``texture-vs-shape/stimuli/style-transfer-preprocessed-512``) are named
``<shape class><n>-<texture class><m>.png``, e.g. ``airplane1-bicycle2.png``, and usually sit in a folder named after
their shape class. Both labels come from the file name. Images whose two classes agree are left out, as in the
standard shape-bias protocol.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections import Counter
from pathlib import Path
from typing import Annotated, Any, Callable, Literal

import numpy as np
import torch
from pydantic import Field

from . import (DataBundle, DataContext, DatasetInfo, FillingSplit, RowStore, Split, StreamSplit, batch_tensor,
               seeded_split)
from .cache import cached_tensors, read_cached, write_cached_later
from .shapes import to_float
from ..errors import UserError
from ..registry import DATASETS

# The 16 entry-level categories of Geirhos et al. (2019), shared by 16-class ImageNet and the cue-conflict stimuli.
GEIRHOS_16_CLASSES = ("airplane", "bear", "bicycle", "bird", "boat", "bottle", "car", "cat", "chair", "clock", "dog",
                      "elephant", "keyboard", "knife", "oven", "truck")
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"})
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_CUE_CONFLICT_NAME = re.compile(r"^(?P<shape>[^\d-]+)\d+-(?P<texture>[^\d-]+)\d+$")
_CACHE_VERSION = 3  # 2: 16-bit and transparent images decode to their values; 3: torch's bicubic resize


# ---------------------------------------------------------------------------------------------------- listing

def _images_in(folder: Path, *, recursive: bool = False) -> list[Path]:
    """Image files (by suffix, hidden files skipped) in ``folder``, sorted."""
    if recursive:
        return sorted(p for p in folder.rglob("*") if p.is_file() and _is_image_name(p.name))
    with os.scandir(folder) as entries:  # the directory's own file types: no stat a file (iterdir's is_file: 3x)
        names = sorted(entry.name for entry in entries if _is_image_name(entry.name) and entry.is_file())
    return [folder / name for name in names]  # one folder: sorted by name is sorted by path


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_SUFFIXES


def _existing_folder(root: str | Path, what: str) -> Path:
    path = Path(root)
    if not path.exists():
        raise UserError(f"{what} {str(root)!r} does not exist")
    if not path.is_dir():
        raise UserError(f"{what} {str(root)!r} is not a folder")
    return path


def _class_folders(root: Path, classes: list[str] | None, strict_classes: bool) -> tuple[list[str], list[str]]:
    """The class names to use and the class folders present; a UserError when they do not fit (see below)."""
    present = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    names = sorted(set(classes)) if classes is not None else present
    if classes is not None:
        if strict_classes and (missing := [c for c in names if c not in present]):
            raise UserError(f"image folder {str(root)!r} lacks class folders {missing}; it has {present}")
        if not strict_classes and (unknown := [c for c in present if c not in names]):
            raise UserError(f"image folder {str(root)!r} has class folders {unknown} that are not among the "
                            f"classes {names}")
    return names, present


def list_image_folder(root: str | Path, classes: list[str] | None = None, *,
                      strict_classes: bool = True) -> tuple[list[str], list[tuple[Path, int]]]:
    """Class names (sorted) and (image path, class id) pairs of an ImageFolder-layout folder.

    ``classes`` None: every sub-folder is a class. Given: the folder must hold each of them (other sub-folders are
    skipped) when ``strict_classes``; otherwise (evaluation folders) it may hold a subset but nothing else.
    """
    root = _existing_folder(root, "image folder")
    names, present = _class_folders(root, classes, strict_classes)
    items = [(path, label) for label, name in enumerate(names) if name in present
             for path in _images_in(root / name)]
    if not items:
        raise UserError(f"image folder {str(root)!r} holds no images (expected {str(root)}/<class>/<image>.png)")
    counts = Counter(label for _, label in items)
    if strict_classes and (empty := [name for label, name in enumerate(names) if counts[label] == 0]):
        raise UserError(f"image folder {str(root)!r}: class folders {empty} hold no images")
    return names, items


def parse_cue_conflict_name(path: str | Path) -> tuple[str, str]:
    """(shape class, texture class) from a file name like ``airplane1-bicycle2.png``; UserError if it does not parse."""
    match = _CUE_CONFLICT_NAME.match(Path(path).stem)
    if match is None:
        raise UserError(f"cue-conflict file name {str(path)!r} does not parse as <shape><n>-<texture><m>.<ext> "
                        "(e.g. airplane1-bicycle2.png)")
    return match["shape"], match["texture"]


# ---------------------------------------------------------------------------------------------------- loading

# Modes whose channels are 8-bit, which Pillow converts to RGB itself; those with an alpha channel (or a palette with
# a transparent entry) are composited over black first, so that a transparent pixel is black whatever colour the
# file stores under it.
_EIGHT_BIT_MODES = frozenset({"1", "L", "P", "RGB", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"})
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})


def _as_rgb(image):
    """``image`` as 8-bit RGB with its values kept: 16-bit greyscale (``I;16*``) scaled by 255/65535, alpha
    composited over black; a mode without a fixed range (32-bit ``I``, float ``F``) is refused by name."""
    from PIL import Image

    mode = image.mode
    if mode.startswith("I;16"):
        values = np.asarray(image).astype(np.uint32)  # numpy honours the mode's byte order
        return Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8), "L").convert("RGB")
    if mode in _ALPHA_MODES or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba).convert("RGB")
    if mode in _EIGHT_BIT_MODES:
        return image.convert("RGB")
    raise ValueError(f"pixel mode {mode} has no fixed range to map to 8 bits (save it as 8- or 16-bit greyscale "
                     f"or RGB)")  # decode_image names the file


def load_image(path: Path, resolution: int) -> np.ndarray:
    """(resolution, resolution, 3) uint8: ``decode_image``'s pixels, channels last."""
    return decode_image(path, resolution).permute(1, 2, 0).numpy()


def decode_image(path: Path, resolution: int) -> torch.Tensor:
    """(3, resolution, resolution) uint8: shorter side resized to ``resolution`` (antialiased bicubic), then
    centre-cropped.

    Every mode Pillow opens with a fixed range is decoded to its 8-bit values (see ``_as_rgb``).

    Raises:
        UserError: the file is not an image Pillow reads, or its pixel mode has no fixed range (``I``, ``F``).
    """
    from PIL import Image  # torchvision installs Pillow; imported here so the module loads without it

    try:
        with Image.open(path) as image:
            image.draft("RGB", (resolution, resolution))  # JPEG: decode at a reduced scale, much faster
            pixels = np.array(_as_rgb(image))  # (H, W, 3), writable
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        reason = " ".join(str(err).split()) or type(err).__name__
        raise UserError(f"cannot read image {str(path)!r}: {reason}") from None
    return _resized_and_cropped(pixels, resolution)


def _resized_and_cropped(pixels: np.ndarray, resolution: int) -> torch.Tensor:
    """(H, W, 3) uint8 to (3, resolution, resolution): torch's antialiased bicubic resize of uint8 images (Pillow's
    filter, a = -0.5: values within 1 of Pillow's ``BICUBIC`` when shrinking, 2 when enlarging, and 3.5x faster at
    256 -> 224 px, where Pillow's resize took twice the JPEG decode's time), then the centre crop. Channels first
    from here on: a move back to channels last cost as much as the resize."""
    height, width = pixels.shape[:2]
    scale = resolution / min(width, height)
    size = (max(resolution, round(height * scale)), max(resolution, round(width * scale)))
    top, left = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    if size == (height, width):  # cropped in numpy: its calls cost a few microseconds where torch's cost 10-20
        crop = pixels[top:top + resolution, left:left + resolution]
        return torch.from_numpy(np.ascontiguousarray(crop.transpose(2, 0, 1)))
    image = torch.from_numpy(pixels).permute(2, 0, 1)[None]  # channels last in memory: torch's fast uint8 path
    image = torch.nn.functional.interpolate(image, size=size, mode="bicubic", antialias=True)
    return image[0, :, top:top + resolution, left:left + resolution].contiguous()


def check_images(paths: list[Path], workers: int = 0) -> None:
    """UserError for the first file that is not a readable image, from its header alone (no pixels decoded), read
    by ``workers`` processes (0: this one): a streamed folder is checked so before anything is written."""
    from torch.utils.data import DataLoader

    from . import _one_line_errors

    # its own generator: a DataLoader draws its workers' base seed from torch's global one otherwise, and building
    # the data would move the model's initialisation (a streamed and an in-memory run would then differ)
    for _ in _one_line_errors(iter(DataLoader(_Headers(paths), batch_size=256, num_workers=workers,
                                              collate_fn=len, generator=torch.Generator()))):
        pass


class _Headers:
    """Opens each listed file's header (``check_images``)."""

    def __init__(self, paths: list[Path]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> None:
        from PIL import Image

        path = self.paths[i]
        try:
            if _jpeg_frame_found(path):
                return
            with Image.open(path) as image:
                image.size  # noqa: B018 - reading the header is the check
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            reason = " ".join(str(err).split()) or type(err).__name__
            raise UserError(f"cannot read image {str(path)!r}: {reason}") from None


# Start-of-frame markers (baseline, extended, progressive, lossless; Huffman or arithmetic): the segment that holds
# the image's size and components.
_JPEG_FRAMES = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_JPEG_HEADER_BYTES = 65536  # room for an EXIF segment with its thumbnail before the frame


def _jpeg_frame_found(path: Path) -> bool:
    """Whether ``path`` is a JPEG whose frame header (a size Pillow accepts, 1, 3 or 4 components) is reached by
    walking its marker segments within its first 64 KB: the header check of a JPEG at a quarter of the cost of
    Pillow's, which parses every table in Python on the way (20,000 files of 32 px: 0.74 s with two workers).
    False sends the file to Pillow, which decides and names the error; a table Pillow would refuse is only found
    when the file is decoded (one line, naming the file), as a broken scan is."""
    from PIL import Image

    with open(path, "rb") as file:
        head = file.read(_JPEG_HEADER_BYTES)
    at = 2
    if head[:3] != b"\xff\xd8\xff":
        return False
    while at + 4 <= len(head) and head[at] == 0xFF:
        marker = head[at + 1]
        if marker == 0xFF:  # a fill byte before the marker
            at += 1
            continue
        length = int.from_bytes(head[at + 2:at + 4], "big")
        if marker in _JPEG_FRAMES:
            if length < 8 or at + 2 + length > len(head):
                return False
            height, width = int.from_bytes(head[at + 5:at + 7], "big"), int.from_bytes(head[at + 7:at + 9], "big")
            not_a_bomb = Image.MAX_IMAGE_PIXELS is None or width * height <= Image.MAX_IMAGE_PIXELS
            return 0 < height and 0 < width and head[at + 9] in (1, 3, 4) and not_a_bomb
        if not 0xC0 <= marker <= 0xFE or marker in (0xD8, 0xD9, 0xDA) or 0xD0 <= marker <= 0xD7 or length < 2:
            return False  # a scan, an end or a stray marker before any frame: Pillow decides
        at += 2 + length
    return False


class _Decoded:
    """The listed files as (3, resolution, resolution) uint8 tensors, for DataLoader workers to decode (their batches
    are stacked by torch's collate straight into the shared memory that carries them to the training process)."""

    def __init__(self, paths: list[Path], resolution: int):
        self.paths, self.resolution = paths, resolution

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        return decode_image(self.paths[i], self.resolution)


def load_images(paths: list[Path], resolution: int, workers: int = 0) -> torch.Tensor:
    """(N, 3, resolution, resolution) uint8, decoded by ``workers`` processes (0: in this one), in order."""
    store = _pixel_store(paths, resolution, workers)
    chunks = list(torch.arange(len(paths)).split(256))
    for rows, (pixels, _) in zip(chunks, store.read(chunks)):
        store.put(rows, pixels)
    return store.rows


def _pixel_store(paths: list[Path], resolution: int, workers: int,
                 when_full: Callable[[torch.Tensor], None] | None = None) -> RowStore:
    """The listed images' uint8 pixels, decoded by ``workers`` processes as rows are asked for."""
    return RowStore(_Decoded(paths, resolution), (3, resolution, resolution), torch.uint8, workers=workers,
                    when_full=when_full)


def _listing_key(paths: list[Path], resolution: int) -> dict:
    """What the cached pixels depend on: each file's path, size and modification time, and the resolution. One stat
    a file and no symlink resolution (``resolve`` stats every path component: 0.7 s for 20,000 files); a folder
    reached through another link is only a cache miss."""
    stats = [(os.path.abspath(p), (stat := os.stat(p)).st_size, stat.st_mtime_ns) for p in paths]
    return {"version": _CACHE_VERSION, "resolution": resolution, "files": stats}


def _cached_images(paths: list[Path], resolution: int, ctx: DataContext | None, workers: int = 0) -> torch.Tensor:
    if ctx is None:
        return load_images(paths, resolution, workers)
    build = lambda: {"x": load_images(paths, resolution, workers)}  # noqa: E731
    return cached_tensors(ctx.cache_dir, "folder", _listing_key(paths, resolution), build)["x"]


def load_image_folder(root: str | Path, resolution: int, classes: list[str] | None = None, *,
                      strict_classes: bool = True, ctx: DataContext | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """uint8 images (N, 3, R, R), int64 labels (N,) and the sorted class names of an ImageFolder-layout folder."""
    names, items = list_image_folder(root, classes, strict_classes=strict_classes)
    return (*_load_listed(items, resolution, ctx), names)


def list_cue_conflict(root: str | Path, class_names: list[str]) -> tuple[list[Path], list[int], list[int], int]:
    """Image paths, shape ids and texture ids of a cue-conflict folder, and how many same-class images it left out.

    Images are found in ``root`` and its sub-folders. A sub-folder named after a class must agree with the shape
    class in the file names under it.
    """
    root = _existing_folder(root, "cue-conflict folder")
    paths = _images_in(root, recursive=True)
    if not paths:
        raise UserError(f"cue-conflict folder {str(root)!r} holds no images")
    index = {name: i for i, name in enumerate(class_names)}
    kept, shapes, textures = [], [], []
    for path in paths:
        shape, texture = parse_cue_conflict_name(path)
        for name in (shape, texture):
            if name not in index:
                raise UserError(f"cue-conflict file {str(path)!r} names class {name!r}, not one of {class_names}")
        if path.parent != root and path.parent.name in index and path.parent.name != shape:
            raise UserError(f"cue-conflict file {str(path)!r} has shape class {shape!r} but sits in folder "
                            f"{path.parent.name!r}")
        if shape != texture:
            kept.append(path)
            shapes.append(index[shape])
            textures.append(index[texture])
    if not kept:
        raise UserError(f"cue-conflict folder {str(root)!r} holds only images whose shape and texture agree")
    return kept, shapes, textures, len(paths) - len(kept)


def load_cue_conflict(root: str | Path, resolution: int, class_names: list[str], *,
                      ctx: DataContext | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """uint8 images, shape labels, texture labels of a cue-conflict folder, and how many same-class images it left
    out (see ``list_cue_conflict``)."""
    kept, shapes, textures, same_class = list_cue_conflict(root, class_names)
    x = _cached_images(kept, resolution, ctx)
    return x, torch.tensor(shapes), torch.tensor(textures), same_class


# --------------------------------------------------------------------------------------------------- registry

class _Pixels:
    """uint8 images to the float32 inputs a model sees: [0, 1], optionally standardised with ImageNet statistics."""

    def __init__(self, normalize: str):
        self.normalize = normalize

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """A batch (N, 3, H, W); made in a DataLoader worker, it is written straight into shared memory."""
        return self._standardised(batch_tensor(x.shape, torch.float32).copy_(x).div_(255))  # = to_float(x)

    def one(self, image: torch.Tensor) -> torch.Tensor:
        """One image (3, H, W)."""
        return self._standardised(to_float(image))

    def _standardised(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` standardised in place (the same values as a new tensor, no copies)."""
        if self.normalize == "imagenet":
            mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
            x.sub_(mean).div_(std)
        elif self.normalize == "half":  # mean 0.5, std 0.5 per channel: HF ViT's feature extractor
            x.sub_(0.5).div_(0.5)
        return x


class FolderImages:
    """A map-style dataset of listed images, decoded one at a time when a batch needs them (``StreamSplit``):
    item ``i`` is (float32 (3, H, W) pixels, class id), decoded exactly as the in-memory path decodes."""

    def __init__(self, items: list[tuple[Path, int]], resolution: int, pixels: "_Pixels"):
        self.items, self.resolution, self.pixels = items, resolution, pixels

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.items[i]
        return self.pixels.one(decode_image(path, self.resolution)), label


def _split_train(split: Split | FillingSplit | StreamSplit, fractions: tuple[float, float], seed: int,
                 train_dir: str) -> tuple[Split | FillingSplit | StreamSplit, ...]:
    n = len(split)
    train, val, test = seeded_split(n, fractions, seed)
    for name, index, fraction in (("val", val, fractions[0]), ("test", test, fractions[1])):
        if fraction > 0 and len(index) == 0:
            raise UserError(f"train_dir {train_dir!r} has {n} images: too few for {name}_fraction {fraction}")
    if len(train) == 0:
        raise UserError(f"train_dir {train_dir!r} has {n} images: none left for training after the split")
    return split.subset(train), split.subset(val), split.subset(test)


def check_image_folder(*, train_dir: str, val_dir: str = "", test_dir: str = "", classes: Any = None,
                       eval_dirs: dict[str, str] = {}, cue_conflict_dir: str = "", **_: Any) -> None:
    """Every folder the config names exists (and, for the training folder, holds the classes asked for): checked
    before a run directory exists, without decoding an image."""
    for key, folder in (("val_dir", val_dir), ("test_dir", test_dir), ("cue_conflict_dir", cue_conflict_dir),
                        *((f"eval_dirs.{name}", path) for name, path in eval_dirs.items())):
        if folder:
            _existing_folder(folder, f"data.{key}")
    wanted = list(GEIRHOS_16_CLASSES) if classes == "imagenet16" else classes
    _class_folders(_existing_folder(train_dir, "data.train_dir"), wanted, strict_classes=True)


@DATASETS.register("image_folder", check=check_image_folder)
def build_image_folder(
    ctx: DataContext,
    *,
    train_dir: str,
    val_dir: str = "",
    test_dir: str = "",
    val_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.1,
    test_fraction: Annotated[float, Field(ge=0, lt=1)] = 0.1,
    resolution: Annotated[int, Field(ge=8, le=512)] = 64,
    classes: list[str] | Literal["imagenet16"] | None = None,
    eval_dirs: dict[str, str] = {},  # noqa: B006 - the registry reads defaults, it never mutates them
    cue_conflict_dir: str = "",
    normalize: Literal["none", "imagenet", "half"] = "none",
    stream: bool = True,
    workers: Annotated[int, Field(ge=0)] = 2,
) -> DataBundle:
    """Images in ImageFolder layout (``<dir>/<class>/<image>``) at ``resolution`` pixels, streamed: each batch is
    decoded by ``workers`` DataLoader processes when training reaches it (``stream: false``: each image decoded
    once, by ``workers`` processes as the first epoch reaches it, then held in memory and cached under the cache
    directory for later runs; the cue-conflict set is always held in memory).

    ``val_dir`` / ``test_dir`` left empty: split off ``train_dir`` with the run seed (``val_fraction``,
    ``test_fraction``). ``classes``: the class folders to use (``imagenet16``: the 16 classes of Geirhos et al.);
    ids follow the sorted names. ``eval_dirs``: further named evaluation sets in the same layout (e.g. a
    mean-pooled copy of the test set). ``cue_conflict_dir``: Geirhos cue-conflict stimuli, attached as
    ``cue_conflict`` (y = shape) and ``cue_conflict_texture`` (y = texture); see ``list_cue_conflict``.
    Inputs are float32 (3, H, W) in [0, 1], or standardised when ``normalize: imagenet`` (``half``:
    mean and std 0.5, as HF ViT's feature extractor).
    """
    wanted = list(GEIRHOS_16_CLASSES) if classes == "imagenet16" else classes
    # Every listing is checked before any pixel is read, so a bad folder costs no decoding and writes no cache.
    names, train_items = list_image_folder(train_dir, wanted)
    listed = lambda folder: list_image_folder(folder, names, strict_classes=False)[1]  # noqa: E731
    held_out = {name: listed(folder) for name, folder in (("val", val_dir), ("test", test_dir)) if folder}
    extra_items = {name: listed(folder) for name, folder in eval_dirs.items()}
    conflict = list_cue_conflict(cue_conflict_dir, names) if cue_conflict_dir else None
    pixels = _Pixels(normalize)

    def split_of(items: list[tuple[Path, int]]) -> Split | FillingSplit | StreamSplit:
        if stream:
            check_images([path for path, _ in items], workers)
            labels = torch.tensor([label for _, label in items], dtype=torch.long)
            return StreamSplit(FolderImages(items, resolution, pixels), labels, workers)
        return _held_in_memory(items, resolution, ctx, workers, pixels)

    fractions = (0.0 if val_dir else val_fraction, 0.0 if test_dir else test_fraction)
    train, val, test = _split_train(split_of(train_items), fractions, ctx.seed, train_dir)
    val = split_of(held_out["val"]) if "val" in held_out else val
    test = split_of(held_out["test"]) if "test" in held_out else test
    info = DatasetInfo((3, resolution, resolution), num_classes=len(names), class_names=names)
    extra = {name: split_of(items) for name, items in extra_items.items()}
    if conflict is not None:
        kept, shapes, textures, same_class = conflict
        x = _cached_images(kept, resolution, ctx, workers)  # one tensor, two label sets: shape and texture
        extra.update(cue_conflict=Split(x, torch.tensor(shapes), pixels),
                     cue_conflict_texture=Split(x, torch.tensor(textures), pixels))
        info = dataclasses.replace(info, cue_conflict_pairs={"cue_conflict": "cue_conflict_texture"},
                                   facts={"cue_conflict_same_class_excluded": same_class})
    return DataBundle(train=train, val=val, test=test, info=info, extra_eval=extra)


def _held_in_memory(items: list[tuple[Path, int]], resolution: int, ctx: DataContext, workers: int,
                    pixels: "_Pixels") -> Split | FillingSplit:
    """The listed images as uint8 in memory (float batch by batch): read from the data cache when an earlier run
    wrote them; otherwise decoded by ``workers`` processes as the first epoch's batches need them (that epoch
    streams, at the streamed reader's speed) and written to the cache, in the background, once every image is in."""
    paths = [path for path, _ in items]
    y = torch.tensor([label for _, label in items], dtype=torch.long)
    key = _listing_key(paths, resolution)
    if (cached := read_cached(ctx.cache_dir, "folder", key)) is not None:
        return Split(cached["x"], y, pixels, workers)
    check_images(paths, workers)  # an unreadable file is found before anything is written
    store = _pixel_store(paths, resolution, workers,
                         when_full=lambda x: write_cached_later(ctx.cache_dir, "folder", key, {"x": x}))
    return FillingSplit(store, y, pixels)


def _load_listed(items: list[tuple[Path, int]], resolution: int, ctx: DataContext | None, workers: int = 0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images and int64 labels of listed (path, class id) pairs (decoded by ``workers`` processes)."""
    x = _cached_images([p for p, _ in items], resolution, ctx, workers)
    return x, torch.tensor([label for _, label in items], dtype=torch.long)
