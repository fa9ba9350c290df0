"""The procedural shapes-and-textures dataset, its cache, and the shape-bias metric."""

import math

import pytest
import torch

from instill import registry
from instill.data import DataContext
from instill.data import shapes
from instill.data.shapes import MAX_CLASSES, ShapesSpec, build_shapes, generate
from instill.errors import UserError
from instill.stages.task import shape_bias

SMALL = dict(n_train=64, n_val=16, n_test=48)


def colours_per_image(images: torch.Tensor) -> list[int]:
    """How many distinct RGB colours each uint8 (N, 3, H, W) image holds."""
    return [len(torch.unique(image.flatten(1), dim=1).T) for image in images]


def test_generation_is_a_function_of_the_seed():
    spec = ShapesSpec(num_classes=MAX_CLASSES)
    first, again, other = generate(spec, 40, 7), generate(spec, 40, 7), generate(spec, 40, 8)
    assert torch.equal(first.textured, again.textured) and torch.equal(first.shape, again.shape)
    assert not torch.equal(first.textured, other.textured)


def test_bundle_shapes_dtypes_and_ranges(tmp_path):
    bundle = build_shapes(DataContext(0, str(tmp_path)), num_classes=5, resolution=64, **SMALL)
    assert bundle.info.input_shape == (3, 64, 64) and bundle.info.num_classes == 5
    assert bundle.info.class_names == tuple(shapes.SHAPES)[:5]
    assert set(bundle.extra_eval) == {"textured", "shape_only", "cue_conflict", "cue_conflict_texture"}
    for name, split in {"train": bundle.train, **bundle.eval_sets()}.items():
        assert split.x.dtype == torch.float32 and split.x.shape[1:] == (3, 64, 64), name
        assert split.y.dtype == torch.int64 and len(split.y) == len(split.x), name
        assert 0 <= split.x.min() and split.x.max() <= 1, name
        assert 0 <= split.y.min() and split.y.max() < 5, name
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (64, 16, 48)
    assert torch.equal(bundle.test.x, bundle.extra_eval["textured"].x)  # default variant: textured


def test_shape_only_is_the_textured_image_mean_pooled_per_region():
    sample = generate(ShapesSpec(num_classes=MAX_CLASSES), 60, 3)
    assert set(colours_per_image(sample.shape_only)) == {2}  # shape and background, texture gone
    assert min(colours_per_image(sample.textured)) > 2
    for textured, pooled in zip(sample.textured.float(), sample.shape_only.float()):
        regions = torch.unique(pooled.flatten(1), dim=1).T
        for colour in regions:
            inside = (pooled == colour[:, None, None]).all(0)
            region_mean = textured[:, inside].mean(1)
            assert torch.allclose(region_mean, colour, atol=1.0)  # within uint8 rounding


def test_background_texture_can_be_switched_off():
    plain = generate(ShapesSpec(num_classes=MAX_CLASSES, texture_background=False), 40, 5)
    for textured, pooled in zip(plain.textured.float(), plain.shape_only.float()):
        spreads = []
        for colour in torch.unique(pooled.flatten(1), dim=1).T:
            inside = (pooled == colour[:, None, None]).all(0)
            spreads.append(float(textured[:, inside].std(1).max()))
        assert sorted(spreads)[0] == 0 and sorted(spreads)[1] > 0  # a flat background, a textured shape


def test_cue_conflict_texture_differs_from_shape_and_covers_the_other_classes():
    k = 6
    conflict = generate(ShapesSpec(num_classes=k), 600, 1, conflict=True)
    assert (conflict.shape != conflict.texture).all()
    for shape in range(k):
        assert set(conflict.texture[conflict.shape == shape].tolist()) == set(range(k)) - {shape}
    plain = generate(ShapesSpec(num_classes=k), 50, 1)
    assert torch.equal(plain.shape, plain.texture)


def test_bundle_cue_conflict_pair_shares_images(tmp_path):
    bundle = build_shapes(DataContext(1, str(tmp_path)), **SMALL)
    shape_set, texture_set = bundle.extra_eval["cue_conflict"], bundle.extra_eval["cue_conflict_texture"]
    assert torch.equal(shape_set.x, texture_set.x) and (shape_set.y != texture_set.y).all()
    assert bundle.info.cue_conflict_pairs == {"cue_conflict": "cue_conflict_texture"}


def test_variants_select_the_training_images(tmp_path):
    ctx = DataContext(2, str(tmp_path))
    textured = build_shapes(ctx, **SMALL)
    pooled = build_shapes(ctx, variant="shape_only", **SMALL)
    mixed = build_shapes(ctx, variant="mixed", **SMALL)
    assert torch.equal(textured.train.y, pooled.train.y)  # the same draws, rendered two ways
    as_uint8 = lambda x: (x * 255).round().to(torch.uint8)  # noqa: E731
    assert set(colours_per_image(as_uint8(pooled.train.x))) == {2}
    is_pooled = [n == 2 for n in colours_per_image(as_uint8(mixed.train.x))]
    assert 0.25 < sum(is_pooled) / len(is_pooled) < 0.75


def test_the_test_sets_do_not_depend_on_the_training_size(tmp_path):
    a = build_shapes(DataContext(4, str(tmp_path)), **SMALL)
    b = build_shapes(DataContext(4, str(tmp_path)), **{**SMALL, "n_train": 32})
    for name in ("textured", "shape_only", "cue_conflict"):
        assert torch.equal(a.extra_eval[name].x, b.extra_eval[name].x), name
    assert not torch.equal(a.train.x[:32], build_shapes(DataContext(5, str(tmp_path)), **SMALL).train.x[:32])


def test_second_build_reads_the_cache(tmp_path, monkeypatch):
    ctx = DataContext(5, str(tmp_path / "cache"))
    first = build_shapes(ctx, **SMALL)
    files = list((tmp_path / "cache").iterdir())
    assert len(files) == 1 and files[0].suffix == ".safetensors"  # no temporary file left behind
    monkeypatch.setattr(shapes, "_generate_all", lambda *a, **k: pytest.fail("regenerated despite the cache"))
    second = build_shapes(ctx, **SMALL)
    assert torch.equal(first.train.x, second.train.x) and torch.equal(first.test.y, second.test.y)


def test_the_cache_keeps_the_recently_used_files_within_its_limit(tmp_path, monkeypatch):
    import os

    ctx = DataContext(5, str(tmp_path))
    build_shapes(ctx, **SMALL)
    (one_file,) = tmp_path.iterdir()
    size = one_file.stat().st_size
    monkeypatch.setenv("INSTILL_CACHE_MB", str(2.5 * size / 2**20))  # room for two files, not three
    os.utime(one_file, (1, 1))  # long unused
    build_shapes(DataContext(6, str(tmp_path)), **SMALL)
    build_shapes(ctx, **SMALL)  # read back: now the most recently used
    assert len(list(tmp_path.iterdir())) == 2
    build_shapes(DataContext(7, str(tmp_path)), **SMALL)  # a third file pushes out the least recently used (seed 6)
    left = list(tmp_path.iterdir())
    assert len(left) == 2 and one_file in left


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_a_corrupt_cache_file_is_regenerated(tmp_path, damage):
    ctx = DataContext(6, str(tmp_path))
    expected = build_shapes(ctx, **SMALL)
    (path,) = tmp_path.iterdir()
    data = path.read_bytes()
    path.write_bytes({"garbage": b"not a safetensors file" * 10, "truncated": data[: len(data) // 2],
                      "empty": b""}[damage])
    rebuilt = build_shapes(ctx, **SMALL)
    assert torch.equal(expected.train.x, rebuilt.train.x)
    assert path.read_bytes() == data  # and the cache file is whole again


def test_settings_that_cannot_make_images_are_user_errors():
    with pytest.raises(UserError, match="shape_contrast"):
        ShapesSpec(texture_contrast=0.5, shape_contrast=0.45).check()
    with pytest.raises(UserError, match="min_scale"):
        ShapesSpec(min_scale=0.9, max_scale=0.5).check()
    with pytest.raises(UserError, match="num_classes"):
        ShapesSpec(num_classes=MAX_CLASSES + 1).check()


def test_registered_keys_are_validated(monkeypatch):
    monkeypatch.setattr(registry, "_BUILTINS_IMPORTED", True)  # only this module's registrations
    assert registry.DATASETS.validate("shapes", {"resolution": 64})["resolution"] == 64
    with pytest.raises(ValueError, match="variant"):
        registry.DATASETS.validate("shapes", {"variant": "stylised"})
    with pytest.raises(ValueError, match="num_classes"):
        registry.DATASETS.validate("shapes", {"num_classes": MAX_CLASSES + 1})


def test_shape_bias_counts_shape_and_texture_decisions_per_shape_class():
    shape = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    texture = torch.tensor([1, 2, 0, 0, 2, 2, 0])  # index 2 and 5 agree: left out
    pred = torch.tensor([0, 2, 0, 1, 0, 2, 1])  # shape, texture, -, shape, other, -, other
    bias = shape_bias(pred, shape, texture, num_classes=4)
    assert (bias.shape_decisions, bias.texture_decisions, bias.images) == (2, 1, 5)
    assert bias.overall == pytest.approx(2 / 3)
    assert bias.per_class[:2] == [0.5, 1.0] and math.isnan(bias.per_class[2]) and math.isnan(bias.per_class[3])
    assert bias.shape_accuracy == pytest.approx(2 / 5) and bias.texture_accuracy == pytest.approx(1 / 5)
