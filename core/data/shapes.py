"""Procedural shapes-and-textures images: a toy, CPU-sized stand-in for the shape-versus-texture experiments.

Class ``k`` is "shape ``k`` drawn with texture ``k``". Every image is a shape (random position, scale, rotation)
on a background; the shape and the background each get a random mean colour (far enough apart that the shape
stays visible) and a luminance texture on top. Variants:

* ``textured``: the texture of the image's class, so shape and texture both predict the label;
* ``shape_only``: each region (shape, background) filled with its mean colour, the analogue of the paper's
  mean-pooled images (every SAM segment painted with its mean colour): texture gone, silhouette kept;
* ``cue_conflict``: the shape of class ``i`` with the texture of class ``j != i``.

Textures are not rotated with the shape: each has a fixed orientation and period (up to ``texture_jitter``) and a
random phase, so its signature is a global frequency pattern. That, and drawing the texture over the background
too (``texture_background``, as in stylised cue-conflict images), is what lets a fully connected network on raw
pixels pick texture up; with the texture only inside a small shape it cannot. Shapes have no such help: a fully
connected network learns them only when the pose varies little, so ``max_rotation`` and ``position_jitter`` narrow
it (upright shapes near the centre: shape-only accuracy of a 4x256 FCN goes from about 0.37 to 0.86 at 32 px).

Everything is vectorised torch over whole chunks of images and draws from a ``torch.Generator`` seeded per split,
so a split is a pure function of (seed, settings, split name, size). Images are quantised to uint8 once, so a
cached copy and a fresh one are identical.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Annotated, Callable, Literal

import torch
from pydantic import Field

from . import DataBundle, DataContext, DatasetInfo, Split
from .cache import cached_tensors
from ..errors import UserError
from ..registry import DATASETS
from ..seeds import derive_seed

# Bump when the rendering changes, so stale caches are not reused.
GENERATOR_VERSION = 2
_CHUNK = 1024  # images rendered at once: bounds memory at 64 px, and fixes the noise draws per chunk
_BASE_PERIOD = 0.25  # texture period in image half-widths at texture_frequency 1: 4 px at 32 px
_MAX_SHAPE_CONTRAST = 0.85  # of the colour range left by the texture: below sqrt(3)/2, so always reachable


# ----------------------------------------------------------------------------------------------------- shapes
# Each shape is an indicator on shape coordinates (u, v), the shape fitting in about the unit disc.

def _regular_polygon(sides: int, radius: float) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    sector = 2 * math.pi / sides

    def inside(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        angle = torch.remainder(torch.atan2(v, u), sector) - sector / 2
        return torch.hypot(u, v) * torch.cos(angle) <= radius * math.cos(math.pi / sides)

    return inside


def _star(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    turns = torch.remainder(torch.atan2(v, u) * 5 / (2 * math.pi), 1.0)
    spike = (2 * turns - 1).abs()  # 1 at the five tips, 0 between them
    return torch.hypot(u, v) <= 0.42 + 0.53 * spike


def _heart(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    x, y = u * 1.25, v * 1.25 + 0.1
    return (x * x + y * y - 1) ** 3 - x * x * y**3 <= 0


def _box(u, v, u0, u1, v0, v1) -> torch.Tensor:
    return (u >= u0) & (u <= u1) & (v >= v0) & (v <= v1)


SHAPES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "circle": lambda u, v: torch.hypot(u, v) <= 0.85,
    "square": lambda u, v: torch.maximum(u.abs(), v.abs()) <= 0.65,
    "triangle": _regular_polygon(3, 0.95),
    "cross": lambda u, v: _box(u, v, -0.28, 0.28, -0.9, 0.9) | _box(u, v, -0.9, 0.9, -0.28, 0.28),
    "star": _star,
    "heart": _heart,
    "ring": lambda u, v: (torch.hypot(u, v) <= 0.9) & (torch.hypot(u, v) >= 0.5),
    "ell": lambda u, v: _box(u, v, -0.7, -0.2, -0.8, 0.8) | _box(u, v, -0.7, 0.7, -0.8, -0.3),
    "crescent": lambda u, v: (torch.hypot(u, v) <= 0.9) & (torch.hypot(u - 0.45, v) > 0.65),
    "tee": lambda u, v: _box(u, v, -0.8, 0.8, 0.35, 0.8) | _box(u, v, -0.22, 0.22, -0.85, 0.8),
    "arrow": lambda u, v: (_box(u, v, -1, 1, 0.05, 0.9) & (u.abs() <= (0.9 - v) * 0.8))
    | _box(u, v, -0.2, 0.2, -0.9, 0.05),
    "hexagon": _regular_polygon(6, 0.88),
}


# --------------------------------------------------------------------------------------------------- textures
# Each texture maps (x, y, period, cells) to a {0, 1} pattern; x, y are image coordinates shifted by a random
# per-image phase, ``period`` is per image (N, 1, 1), and ``cells`` draws per-cell random bits for noise textures.

def _square_wave(phase: torch.Tensor) -> torch.Tensor:
    return (torch.remainder(phase, 1.0) < 0.5).float()


def _lattice(x: torch.Tensor, y: torch.Tensor, spacing: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Offsets in [-0.5, 0.5) from the nearest lattice point, in units of ``spacing``."""
    return torch.remainder(x / spacing, 1.0) - 0.5, torch.remainder(y / spacing, 1.0) - 0.5


def _checks(x, y, period, cells):
    return (_square_wave(x / (1.5 * period)) != _square_wave(y / (1.5 * period))).float()


def _dots(x, y, period, cells):
    dx, dy = _lattice(x, y, 1.5 * period)
    return (dx * dx + dy * dy < 0.3**2).float()


def _grid(x, y, period, cells):
    dx, dy = _lattice(x, y, 2 * period)
    return ((dx.abs() > 0.35) | (dy.abs() > 0.35)).float()


def _hatch(x, y, period, cells):
    d1, d2 = _lattice(x + y, x - y, 2 * period)
    return ((d1.abs() > 0.35) | (d2.abs() > 0.35)).float()


TEXTURES: dict[str, Callable[..., torch.Tensor]] = {
    "stripes": lambda x, y, period, cells: _square_wave(y / period),
    "bars": lambda x, y, period, cells: _square_wave(x / period),
    "checks": _checks,
    "dots": _dots,
    "noise": lambda x, y, period, cells: cells(1, 0.5),
    "diagonal": lambda x, y, period, cells: _square_wave((x + y) / (math.sqrt(2) * period)),
    "grid": _grid,
    "blocks": lambda x, y, period, cells: cells(4, 0.5),
    "waves": lambda x, y, period, cells: _square_wave((y + 0.4 * period * torch.sin(math.pi * x / period)) / period),
    "hatch": _hatch,
    "stipple": lambda x, y, period, cells: cells(1, 0.15),
    "zigzag": lambda x, y, period, cells: _square_wave(
        (y + 0.5 * period * (2 * torch.remainder(x / period, 1.0) - 1).abs()) / period),
}

MAX_CLASSES = min(len(SHAPES), len(TEXTURES))


# ------------------------------------------------------------------------------------------------- generation

@dataclass(frozen=True)
class ShapesSpec:
    """How the images look; everything but the seed and the sizes."""

    num_classes: int = 8
    resolution: int = 32
    texture_background: bool = True  # texture over the background too (stylised look), not only inside the shape
    texture_contrast: float = 0.5  # peak-to-peak luminance of the texture, in [0, 1]
    texture_frequency: float = 1.0  # 1: a period of 1/8 of the image width (4 px at 32 px)
    texture_jitter: float = 0.0  # relative random spread of each image's texture period
    shape_contrast: float = 0.35  # least RGB distance between the shape's and the background's mean colours
    min_scale: float = 0.6  # shape radius, in image half-widths
    max_scale: float = 0.9
    max_rotation: float = 180.0  # shapes turn by a uniform angle in [-max_rotation, max_rotation] degrees
    position_jitter: float = 1.0  # fraction of the free room around the shape its centre may move by

    def check(self) -> None:
        """Raise UserError for settings that cannot make images."""
        if not 2 <= self.num_classes <= MAX_CLASSES:
            raise UserError(f"num_classes must be in [2, {MAX_CLASSES}] (got {self.num_classes})")
        if not 0 <= self.max_rotation <= 180:
            raise UserError(f"max_rotation must be in [0, 180] degrees (got {self.max_rotation})")
        if not 0 <= self.position_jitter <= 1:
            raise UserError(f"position_jitter must be in [0, 1] (got {self.position_jitter})")
        if not 0 < self.min_scale <= self.max_scale <= 1:
            raise UserError(f"need 0 < min_scale <= max_scale <= 1 (got {self.min_scale}, {self.max_scale})")
        if self.shape_contrast > _MAX_SHAPE_CONTRAST * (1 - self.texture_contrast):
            raise UserError(f"shape_contrast {self.shape_contrast} cannot exceed {_MAX_SHAPE_CONTRAST} * "
                            f"(1 - texture_contrast) = {_MAX_SHAPE_CONTRAST * (1 - self.texture_contrast):.2f}: "
                            "the two mean colours would not fit in [0, 1]")


@dataclass
class ShapesSample:
    """``n`` rendered images: the same draws with texture and mean-pooled, as uint8 (N, 3, H, W)."""

    textured: torch.Tensor
    shape_only: torch.Tensor
    shape: torch.Tensor  # int64 (N,) shape class
    texture: torch.Tensor  # int64 (N,) texture class


def generate(spec: ShapesSpec, n: int, seed: int, *, conflict: bool = False) -> ShapesSample:
    """Render ``n`` images. ``conflict``: texture class drawn uniformly among the classes other than the shape's."""
    spec.check()
    gen = torch.Generator().manual_seed(seed)
    k = spec.num_classes
    shape = torch.randint(k, (n,), generator=gen)
    texture = (shape + torch.randint(1, k, (n,), generator=gen)) % k if conflict else shape.clone()
    draws = _draw_layout(spec, n, gen)
    textured, shape_only = [], []
    for start in range(0, n, _CHUNK):
        part = slice(start, min(start + _CHUNK, n))
        chunk_gen = torch.Generator().manual_seed(derive_seed(seed, f"chunk{start}", legacy="stream"))
        image, pooled = _render(spec, shape[part], texture[part], {a: b[part] for a, b in draws.items()}, chunk_gen)
        textured.append(_to_uint8(image))
        shape_only.append(_to_uint8(pooled))
    return ShapesSample(torch.cat(textured), torch.cat(shape_only), shape, texture)


def _draw_layout(spec: ShapesSpec, n: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Per-image random draws: pose, texture phase and period, and the two mean colours."""
    scale = spec.min_scale + (spec.max_scale - spec.min_scale) * torch.rand(n, generator=gen)
    room = (1 - scale) * spec.position_jitter  # keeps the shape in the image
    centre = (torch.rand(n, 2, generator=gen) * 2 - 1) * room[:, None]
    angle = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(spec.max_rotation)
    phase = torch.rand(n, 2, generator=gen) * 16  # any offset: the textures are periodic or per-cell random
    period = _BASE_PERIOD / spec.texture_frequency * (1 + spec.texture_jitter * (2 * torch.rand(n, generator=gen) - 1))
    inner, outer = _mean_colours(spec, n, gen)
    return {"scale": scale, "centre": centre, "angle": angle, "phase": phase, "period": period,
            "inner": inner, "outer": outer}


def _mean_colours(spec: ShapesSpec, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Shape and background mean colours at least ``shape_contrast`` apart, leaving room for the texture."""
    low, high = spec.texture_contrast / 2, 1 - spec.texture_contrast / 2
    inner = low + (high - low) * torch.rand(n, 3, generator=gen)
    outer = low + (high - low) * torch.rand(n, 3, generator=gen)
    for _ in range(200):  # rejection sampling; each round redraws the pairs that are too close
        close = (inner - outer).norm(dim=1) < spec.shape_contrast
        if not close.any():
            break
        outer[close] = low + (high - low) * torch.rand(int(close.sum()), 3, generator=gen)
    else:  # near the limit: the opposite corner of the colour cube is at least sqrt(3)/2 (high - low) away
        outer[close] = torch.where(inner[close] < 0.5, high, low)
    return inner, outer


def _pixel_grid(resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-centre coordinates in [-1, 1], y pointing up."""
    t = (torch.arange(resolution, dtype=torch.float32) + 0.5) / resolution * 2 - 1
    y, x = torch.meshgrid(-t, t, indexing="ij")
    return x, y


def _shape_masks(shape: torch.Tensor, draws: dict[str, torch.Tensor], resolution: int) -> torch.Tensor:
    """(N, H, W) bool: inside each image's shape."""
    x, y = _pixel_grid(resolution)
    cos, sin = draws["angle"].cos()[:, None, None], draws["angle"].sin()[:, None, None]
    dx = (x - draws["centre"][:, 0, None, None]) / draws["scale"][:, None, None]
    dy = (y - draws["centre"][:, 1, None, None]) / draws["scale"][:, None, None]
    u, v = cos * dx + sin * dy, -sin * dx + cos * dy  # rotate the image by -angle into shape coordinates
    mask = torch.zeros(u.shape, dtype=torch.bool)
    for k, inside in enumerate(list(SHAPES.values())[: int(shape.max()) + 1]):
        rows = shape == k
        if rows.any():
            mask[rows] = inside(u[rows], v[rows])
    return mask


def _textures(texture: torch.Tensor, draws: dict[str, torch.Tensor], resolution: int,
              gen: torch.Generator) -> torch.Tensor:
    """(N, H, W) float {0, 1}: each image's texture pattern over the whole image."""
    x, y = _pixel_grid(resolution)
    x = x + draws["phase"][:, 0, None, None]
    y = y + draws["phase"][:, 1, None, None]
    period = draws["period"][:, None, None]
    out = torch.zeros(x.shape)
    for k, pattern in enumerate(list(TEXTURES.values())[: int(texture.max()) + 1]):
        rows = texture == k
        if rows.any():
            cells = _cell_noise(int(rows.sum()), resolution, gen)
            out[rows] = pattern(x[rows], y[rows], period[rows], cells)
    return out


def _cell_noise(n: int, resolution: int, gen: torch.Generator) -> Callable[[int, float], torch.Tensor]:
    """Random bits on square cells of ``size`` pixels at 32 px (scaled with the resolution), ``p`` of them on."""

    def cells(size: int, p: float) -> torch.Tensor:
        pixels = max(1, round(size * resolution / 32))
        side = -(-resolution // pixels)
        bits = (torch.rand(n, side, side, generator=gen) < p).float()
        return bits.repeat_interleave(pixels, 1).repeat_interleave(pixels, 2)[:, :resolution, :resolution]

    return cells


def _render(spec: ShapesSpec, shape: torch.Tensor, texture: torch.Tensor, draws: dict[str, torch.Tensor],
            gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(textured, mean-pooled) float images (N, 3, H, W) in [0, 1] for one chunk."""
    mask = _shape_masks(shape, draws, spec.resolution)[:, None]
    pattern = spec.texture_contrast * (_textures(texture, draws, spec.resolution, gen) - 0.5)[:, None]
    inner, outer = draws["inner"][:, :, None, None], draws["outer"][:, :, None, None]
    background = outer + pattern if spec.texture_background else outer.expand(-1, -1, *pattern.shape[2:])
    image = torch.where(mask, inner + pattern, background)
    return image, mean_pool(image, mask)


def mean_pool(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each region (``mask`` and its complement) filled with its own mean colour, per image and channel."""
    inside, outside = mask.float(), (~mask).float()
    dims = (2, 3)
    inner = (image * inside).sum(dims, keepdim=True) / inside.sum(dims, keepdim=True).clamp(min=1)
    outer = (image * outside).sum(dims, keepdim=True) / outside.sum(dims, keepdim=True).clamp(min=1)
    return torch.where(mask, inner, outer)


def _to_uint8(image: torch.Tensor) -> torch.Tensor:
    return (image.clamp(0, 1) * 255).round().to(torch.uint8)


def to_float(image: torch.Tensor) -> torch.Tensor:
    """uint8 images to float32 in [0, 1], a new tensor (divided in place: one allocation, not two; the same values)."""
    return image.to(torch.float32, copy=True).div_(255)


# --------------------------------------------------------------------------------------------------- registry

def _generate_all(spec: ShapesSpec, seed: int, variant: str, sizes: dict[str, int]) -> dict[str, torch.Tensor]:
    """Every split's uint8 images and labels; each split draws from its own stream of the run seed."""
    out: dict[str, torch.Tensor] = {}
    for name in ("train", "val", "test"):
        sample = generate(spec, sizes[name], derive_seed(seed, name, legacy="stream"))
        out[f"{name}_x"] = _pick_variant(sample, variant, derive_seed(seed, f"{name}/mix", legacy="stream"))
        out[f"{name}_y"] = sample.shape
        if name == "test":  # the test draws both ways, for the textured / shape_only evaluations
            out["test_textured"], out["test_shape_only"] = sample.textured, sample.shape_only
    conflict = generate(spec, sizes["test"], derive_seed(seed, "cue_conflict", legacy="stream"), conflict=True)
    out["conflict_x"], out["conflict_shape"], out["conflict_texture"] = (conflict.textured, conflict.shape,
                                                                          conflict.texture)
    return out


def _pick_variant(sample: ShapesSample, variant: str, seed: int) -> torch.Tensor:
    """The images of ``variant``; ``mixed``: each image textured or shape_only with even odds."""
    if variant != "mixed":
        return getattr(sample, variant)
    pooled = torch.rand(len(sample.shape), generator=torch.Generator().manual_seed(seed)) < 0.5
    return torch.where(pooled[:, None, None, None], sample.shape_only, sample.textured)


@DATASETS.register("shapes")
def build_shapes(
    ctx: DataContext,
    *,
    num_classes: Annotated[int, Field(ge=2, le=MAX_CLASSES)] = 8,
    resolution: Annotated[int, Field(ge=16, le=256)] = 32,
    n_train: Annotated[int, Field(ge=1)] = 10_000,
    n_val: Annotated[int, Field(ge=1)] = 1_000,
    n_test: Annotated[int, Field(ge=1)] = 1_000,
    variant: Literal["textured", "shape_only", "mixed"] = "textured",
    texture_background: bool = True,
    texture_contrast: Annotated[float, Field(gt=0, le=1)] = 0.5,
    texture_frequency: Annotated[float, Field(gt=0, le=4)] = 1.0,
    texture_jitter: Annotated[float, Field(ge=0, lt=1)] = 0.0,
    shape_contrast: Annotated[float, Field(gt=0, le=1)] = 0.35,
    min_scale: Annotated[float, Field(gt=0, le=1)] = 0.6,
    max_scale: Annotated[float, Field(gt=0, le=1)] = 0.9,
    max_rotation: Annotated[float, Field(ge=0, le=180)] = 180.0,
    position_jitter: Annotated[float, Field(ge=0, le=1)] = 1.0,
    cache: bool = True,
) -> DataBundle:
    """Procedural shapes with textures: class k is shape k drawn with texture k.

    train / val / test hold ``variant`` images labelled by class (``mixed``: each image textured or shape_only
    with even odds, like the paper's "+DA" baseline, or a base model that has seen both cues). ``extra_eval``:
    ``textured`` and ``shape_only`` (the same test draws, with and without texture), ``cue_conflict`` (shape of
    class i, texture of class j != i, labelled by shape) and ``cue_conflict_texture`` (the very same images
    labelled by texture). Shape bias = shape accuracy / (shape accuracy + texture accuracy) over that pair, which
    ``info.cue_conflict_pairs`` names; ``instill.stages.task.shape_bias`` gives it per class from predictions.
    Images are float32 (3, H, W) in [0, 1].
    """
    spec = ShapesSpec(num_classes, resolution, texture_background, texture_contrast, texture_frequency,
                      texture_jitter, shape_contrast, min_scale, max_scale, max_rotation, position_jitter)
    spec.check()
    sizes = {"train": n_train, "val": n_val, "test": n_test}
    key = {"version": GENERATOR_VERSION, "seed": ctx.seed, "variant": variant, **sizes, **asdict(spec)}
    make = lambda: _generate_all(spec, ctx.seed, variant, sizes)  # noqa: E731
    t = cached_tensors(ctx.cache_dir, "shapes", key, make) if cache else make()
    conflict_x = to_float(t["conflict_x"])
    shape_names = list(SHAPES)[:num_classes]
    return DataBundle(
        train=Split(to_float(t["train_x"]), t["train_y"]),
        val=Split(to_float(t["val_x"]), t["val_y"]),
        test=Split(to_float(t["test_x"]), t["test_y"]),
        info=DatasetInfo((3, resolution, resolution), num_classes=num_classes, class_names=shape_names,
                         cue_conflict_pairs={"cue_conflict": "cue_conflict_texture"},
                         facts={"texture_names": list(TEXTURES)[:num_classes]}),
        extra_eval={
            "textured": Split(to_float(t["test_textured"]), t["test_y"]),
            "shape_only": Split(to_float(t["test_shape_only"]), t["test_y"]),
            "cue_conflict": Split(conflict_x, t["conflict_shape"]),
            "cue_conflict_texture": Split(conflict_x, t["conflict_texture"]),
        },
    )
