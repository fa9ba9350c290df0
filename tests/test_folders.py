"""Image folders (ImageFolder layout), Geirhos cue-conflict folders, and every bad-input case."""

from pathlib import Path

import pytest
import torch
from PIL import Image

from instill.data import DataContext
from instill.data import folders
from instill.data.folders import build_image_folder, load_cue_conflict, load_image_folder, parse_cue_conflict_name
from instill.errors import UserError

COLOURS = {"cat": (255, 0, 0), "bird": (0, 255, 0), "dog": (0, 0, 255)}


def png(path: Path, colour=(128, 128, 128), size=(20, 12)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def class_folder(root: Path, per_class: int = 4) -> Path:
    for name, colour in COLOURS.items():
        for i in range(per_class):
            png(root / name / f"{i}.png", colour, size=(20 + i, 12))
    return root


def user_error(call, *args, **kwargs) -> str:
    with pytest.raises(UserError) as caught:
        call(*args, **kwargs)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_class_ids_follow_sorted_names_and_images_are_resized(tmp_path):
    root = class_folder(tmp_path / "data")
    (root / "dog" / "notes.txt").write_text("not an image: skipped")
    x, y, names = load_image_folder(root, 8)
    assert names == ["bird", "cat", "dog"]
    assert x.dtype == torch.uint8 and x.shape == (12, 3, 8, 8)
    assert y.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    for image, label in zip(x, y):  # each solid colour survives the resize and crop
        assert image[:, 4, 4].tolist() == list(COLOURS[names[label]])


def test_a_wide_image_is_centre_cropped(tmp_path):
    image = Image.new("RGB", (30, 10), (0, 0, 0))
    image.paste((255, 255, 255), (10, 0, 20, 10))  # white middle third
    image.save(tmp_path / "wide.png")
    pixels = folders.load_image(tmp_path / "wide.png", 10)
    assert pixels.shape == (10, 10, 3) and pixels.min() >= 200  # only the white middle is kept


def test_given_classes_select_folders(tmp_path):
    root = class_folder(tmp_path / "data")
    x, y, names = load_image_folder(root, 8, ["dog", "cat"])
    assert names == ["cat", "dog"] and len(y) == 8 and set(y.tolist()) == {0, 1}


def test_missing_empty_and_unreadable_folders_are_user_errors(tmp_path):
    assert "does not exist" in user_error(load_image_folder, tmp_path / "nowhere", 8)
    png(tmp_path / "file.png")
    assert "is not a folder" in user_error(load_image_folder, tmp_path / "file.png", 8)
    (tmp_path / "empty").mkdir()
    assert "holds no images" in user_error(load_image_folder, tmp_path / "empty", 8)
    (tmp_path / "no_images" / "cat").mkdir(parents=True)
    assert "holds no images" in user_error(load_image_folder, tmp_path / "no_images", 8)
    root = class_folder(tmp_path / "data")
    (root / "owl").mkdir()
    assert "['owl'] hold no images" in user_error(load_image_folder, root, 8)


@pytest.mark.parametrize("content", [b"not a png at all", "truncated"])
def test_an_unreadable_image_is_named(tmp_path, content):
    root = class_folder(tmp_path / "data")
    bad = root / "cat" / "broken.png"
    if content == "truncated":
        data = png(tmp_path / "whole.png", size=(64, 64)).read_bytes()
        content = data[: len(data) // 2]
    bad.write_bytes(content)
    assert str(bad) in user_error(load_image_folder, root, 8)


def test_the_jpeg_header_walk_passes_what_pillow_opens_and_leaves_the_rest_to_pillow(tmp_path, monkeypatch):
    pixels = torch.randint(0, 256, (40, 50, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    image = Image.fromarray(pixels.numpy())
    exif = Image.Exif()
    exif[0x010E] = "x" * 30000  # a large EXIF segment before the frame
    saved = {"rgb": dict(), "progressive": dict(progressive=True), "exif": dict(exif=exif)}
    for name, options in saved.items():
        image.save(tmp_path / f"{name}.jpg", **options)
    image.convert("L").save(tmp_path / "grey.jpg")
    image.convert("CMYK").save(tmp_path / "cmyk.jpg")
    for path in tmp_path.glob("*.jpg"):
        assert folders._jpeg_frame_found(path), path.name
        with Image.open(path) as opened:
            assert opened.size == (50, 40)
    whole = (tmp_path / "rgb.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(whole[:100])  # cut inside its tables, before the frame
    (tmp_path / "text.jpg").write_bytes(b"\xff\xd8\xff but not a JPEG")
    (tmp_path / "empty.jpg").write_bytes(b"")
    image.save(tmp_path / "image.png")
    for name in ("cut.jpg", "text.jpg", "empty.jpg", "image.png"):
        assert not folders._jpeg_frame_found(tmp_path / name), name
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # a decompression bomb: Pillow's own check decides
    assert not folders._jpeg_frame_found(tmp_path / "rgb.jpg")
    root = class_folder(tmp_path / "data")
    (root / "cat" / "cut.jpg").write_bytes(whole[:100])
    assert str(root / "cat" / "cut.jpg") in user_error(load_image_folder, root, 8)
    gone = tmp_path / "gone.jpg"  # listed, then removed before its check: one line naming it, as Pillow's was
    assert str(gone) in user_error(folders.check_images, [gone])


def test_imagenet16_classes_must_all_be_present(tmp_path):
    root = class_folder(tmp_path / "data")
    message = user_error(build_image_folder, DataContext(0, str(tmp_path / "c")), train_dir=str(root),
                         classes="imagenet16")
    assert "lacks class folders" in message and "airplane" in message


def test_geirhos_sixteen_classes_load_in_sorted_order(tmp_path):
    root = tmp_path / "imagenet16"
    for name in reversed(folders.GEIRHOS_16_CLASSES):
        png(root / name / "a.JPEG")
    bundle = build_image_folder(DataContext(0, str(tmp_path / "c")), train_dir=str(root), classes="imagenet16",
                                val_dir=str(root), test_dir=str(root), resolution=16)
    assert bundle.info.class_names == tuple(sorted(folders.GEIRHOS_16_CLASSES)) == folders.GEIRHOS_16_CLASSES
    assert bundle.info.num_classes == 16 and sorted(bundle.train.y.tolist()) == list(range(16))


def test_cue_conflict_names_parse():
    assert parse_cue_conflict_name("airplane1-bicycle2.png") == ("airplane", "bicycle")
    assert parse_cue_conflict_name(Path("x/knife10-elephant7.png")) == ("knife", "elephant")
    for bad in ("airplane-bicycle2.png", "airplane1.png", "airplane1_bicycle2.png", "1-2.png"):
        assert bad in user_error(parse_cue_conflict_name, bad)


def cue_conflict_folder(root: Path) -> Path:
    png(root / "cat" / "cat1-dog3.png", (255, 0, 0))
    png(root / "cat" / "cat2-cat4.png")  # same class: left out
    png(root / "dog" / "dog1-bird2.png", (0, 0, 255))
    png(root / "bird" / "bird1-cat1.png", (0, 255, 0))
    return root


def test_cue_conflict_labels_come_from_the_file_names(tmp_path):
    x, shape, texture, same = load_cue_conflict(cue_conflict_folder(tmp_path / "cc"), 8, ["bird", "cat", "dog"])
    assert x.shape == (3, 3, 8, 8) and same == 1
    assert sorted(zip(shape.tolist(), texture.tolist())) == [(0, 1), (1, 2), (2, 0)]


def test_bad_cue_conflict_folders_are_user_errors(tmp_path):
    names = ["bird", "cat", "dog"]
    root = cue_conflict_folder(tmp_path / "a")
    bad = png(root / "cat" / "cat_3.png")
    assert str(bad) in user_error(load_cue_conflict, root, 8, names)
    bad.unlink()
    unknown = png(root / "cat" / "cat5-owl1.png")
    assert "'owl'" in user_error(load_cue_conflict, root, 8, names)
    unknown.unlink()
    misplaced = png(root / "dog" / "cat5-dog1.png")
    assert str(misplaced) in user_error(load_cue_conflict, root, 8, names)
    assert "does not exist" in user_error(load_cue_conflict, tmp_path / "nowhere", 8, names)
    (tmp_path / "empty").mkdir()
    assert "holds no images" in user_error(load_cue_conflict, tmp_path / "empty", 8, names)


def test_an_in_memory_folder_holds_uint8_pixels_and_gives_float_batches(tmp_path):
    from instill.data import BatchLoader

    root = class_folder(tmp_path / "data", per_class=10)
    bundle = build_image_folder(DataContext(3, str(tmp_path / "cache")), train_dir=str(root), resolution=8,
                                stream=False, normalize="imagenet",
                                cue_conflict_dir=str(cue_conflict_folder(tmp_path / "cc")))
    for split in (bundle.train, bundle.extra_eval["cue_conflict"]):
        assert split.stored.dtype == torch.uint8  # a quarter of the float32 tensor's memory
    whole = bundle.train.x  # every input converted at once: what the model sees
    x, y = next(iter(BatchLoader(bundle.train, 7, shuffle=True, seed=1)))
    index = [int(torch.nonzero((whole == row).flatten(1).all(1))[0]) for row in x]
    assert x.dtype == torch.float32 and torch.equal(x, whole[index]) and torch.equal(y, bundle.train.y[index])


def test_bundle_splits_with_the_seed_and_attaches_eval_sets(tmp_path):
    root = class_folder(tmp_path / "data", per_class=10)
    ctx = DataContext(3, str(tmp_path / "cache"))
    kwargs = dict(train_dir=str(root), resolution=8, val_fraction=0.2, test_fraction=0.1,
                  eval_dirs={"pooled": str(class_folder(tmp_path / "pooled", per_class=1))},
                  cue_conflict_dir=str(cue_conflict_folder(tmp_path / "cc")))
    bundle = build_image_folder(ctx, **kwargs)
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (21, 6, 3)
    everything = torch.cat([bundle.train.x, bundle.val.x, bundle.test.x]).flatten(1)
    assert bundle.train.x.dtype == torch.float32 and float(everything.max()) == 1.0
    assert sorted(bundle.extra_eval) == ["cue_conflict", "cue_conflict_texture", "pooled"]
    assert bundle.info.facts["cue_conflict_same_class_excluded"] == 1
    conflict, texture = bundle.extra_eval["cue_conflict"], bundle.extra_eval["cue_conflict_texture"]
    assert torch.equal(conflict.x, texture.x) and (conflict.y != texture.y).all()
    again = build_image_folder(ctx, **kwargs)
    other_seed = build_image_folder(DataContext(4, ctx.cache_dir), **kwargs)
    assert torch.equal(bundle.val.y, again.val.y) and torch.equal(bundle.val.x, again.val.x)
    assert not torch.equal(bundle.train.x, other_seed.train.x)


def test_given_val_and_test_folders_are_used_whole(tmp_path):
    ctx = DataContext(0, str(tmp_path / "cache"))
    bundle = build_image_folder(ctx, train_dir=str(class_folder(tmp_path / "t", 5)), resolution=8,
                                val_dir=str(class_folder(tmp_path / "v", 2)),
                                test_dir=str(class_folder(tmp_path / "s", 3)), normalize="imagenet")
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (15, 6, 9)
    red = bundle.train.x[bundle.train.y == 1][0, :, 0, 0]  # "cat" is solid red
    assert torch.allclose(red, (torch.tensor([1.0, 0, 0]) - torch.tensor(folders.IMAGENET_MEAN))
                          / torch.tensor(folders.IMAGENET_STD))


def test_an_eval_folder_with_an_unknown_class_is_a_user_error(tmp_path):
    extra = class_folder(tmp_path / "extra", 1)
    png(extra / "owl" / "0.png")
    message = user_error(build_image_folder, DataContext(0, str(tmp_path / "c")),
                         train_dir=str(class_folder(tmp_path / "t", 3)), resolution=8, eval_dirs={"x": str(extra)})
    assert "['owl']" in message


def test_too_few_images_to_split_is_a_user_error(tmp_path):
    root = class_folder(tmp_path / "t", 1)
    assert "too few" in user_error(build_image_folder, DataContext(0, str(tmp_path / "c")), train_dir=str(root),
                                   resolution=8, val_fraction=0.1)


def test_loaded_folders_are_cached(tmp_path, monkeypatch):
    root = class_folder(tmp_path / "data")
    ctx = DataContext(0, str(tmp_path / "cache"))
    first, _, _ = load_image_folder(root, 8, ctx=ctx)
    monkeypatch.setattr(folders, "load_images", lambda *a: pytest.fail("decoded again despite the cache"))
    second, _, _ = load_image_folder(root, 8, ctx=ctx)
    assert torch.equal(first, second)
    png(root / "cat" / "new.png")  # a changed listing misses the cache
    with pytest.raises(pytest.fail.Exception):
        load_image_folder(root, 8, ctx=ctx)


def test_a_bad_cue_conflict_folder_is_found_before_any_image_is_read(tmp_path, monkeypatch):
    root = cue_conflict_folder(tmp_path / "cc")
    png(root / "cat" / "cat_3.png")
    monkeypatch.setattr(folders, "load_images", lambda *a: pytest.fail("pixels read before every listing was checked"))
    message = user_error(build_image_folder, DataContext(0, str(tmp_path / "cache")),
                         train_dir=str(class_folder(tmp_path / "t")), resolution=8, cue_conflict_dir=str(root))
    assert "cat_3.png" in message and not (tmp_path / "cache").exists()


# ------------------------------------------------------------------------------------------- through the stages

def _folder_config(tmp_path: Path, **data) -> Path:
    """A base config training a tiny ConvNet on an image folder with a cue-conflict set."""
    import yaml

    data = {"name": "image_folder", "train_dir": str(class_folder(tmp_path / "train", per_class=10)),
            "resolution": 8, "val_fraction": 0.2, "test_fraction": 0.2,
            "cue_conflict_dir": str(cue_conflict_folder(tmp_path / "cc")), **data}
    config = {"data": data, "model": {"name": "convnet", "channels": [4], "strides": [2]},
              "train": {"epochs": 1, "batch_size": 8, "threads": 1, "progress": False}}
    path = tmp_path / "folder_base.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_the_base_stage_trains_on_a_folder_and_measures_shape_bias_per_class(workdir, tmp_path):
    import json

    from tests.conftest import run_cli

    assert run_cli("base", str(_folder_config(tmp_path)), "--out", "checkpoints/folder") == 0
    summary = json.loads(Path("checkpoints/folder/summary.json").read_text())
    assert 0 <= summary["shape_bias"] <= 1
    assert {f"shape_bias/{name}" for name in COLOURS} <= set(summary)


@pytest.mark.parametrize("breakage, message", [
    ("unreadable", "cannot read image"), ("unparsable", "does not parse"), ("missing", "does not exist")])
def test_bad_folders_through_the_stage_are_one_line_and_write_nothing(workdir, tmp_path, capsys, breakage,
                                                                      message):
    from tests.conftest import run_cli

    config = _folder_config(tmp_path)
    if breakage == "unreadable":
        (tmp_path / "train" / "cat" / "0.png").write_bytes(b"not a png")
    elif breakage == "unparsable":
        png(tmp_path / "cc" / "dog" / "dog.png")
    else:
        config = _folder_config(tmp_path, train_dir=str(tmp_path / "nowhere"))
    assert run_cli("base", str(config), "--out", "checkpoints/folder") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not Path("checkpoints").exists() or not any(Path("checkpoints").iterdir())


# ----------------------------------------------------------------------------------------------------- pixel modes

def _pixels(seed: int, shape: tuple[int, ...], high: int, dtype):
    import numpy as np

    return np.random.default_rng(seed).integers(0, high, shape, endpoint=True).astype(dtype)


def test_every_pillow_mode_decodes_to_its_8_bit_values(tmp_path):
    # Before: a 16-bit PNG came out nearly white (Pillow clips I;16 to 255), transparent pixels kept whatever colour
    # the file stored under them.
    import numpy as np

    size = 16  # the resolution: resizing is then the identity and the values compare exactly
    grey16 = _pixels(0, (size, size), 65535, np.uint16)
    grey8 = (grey16.astype(np.uint32) * 255 + 32767) // 65535
    alpha = _pixels(1, (size, size), 255, np.uint8)
    grey = _pixels(2, (size, size), 255, np.uint8)
    rgb = _pixels(3, (size, size, 3), 255, np.uint8)
    cmy = _pixels(4, (size, size, 3), 255, np.uint8)
    bits = _pixels(5, (size, size), 1, bool)
    palette_index = _pixels(6, (size, size), 3, np.uint8)
    palette = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [9, 99, 199]], dtype=np.uint8)

    def over_black(colour, a):
        return (colour.astype(np.float64) * a[..., None] / 255)

    p_image = Image.fromarray(palette_index, "P")
    p_image.putpalette(palette.flatten().tolist())
    cases = {
        "grey16.png": (Image.fromarray(grey16), np.repeat(grey8[..., None], 3, 2)),
        "grey16b.tif": (Image.frombytes("I;16B", (size, size), grey16.astype(">u2").tobytes()),
                        np.repeat(grey8[..., None], 3, 2)),
        "la.png": (Image.fromarray(np.stack([grey, alpha], 2), "LA"),
                   over_black(np.repeat(grey[..., None], 3, 2), alpha)),
        "rgba.png": (Image.fromarray(np.concatenate([rgb, alpha[..., None]], 2), "RGBA"), over_black(rgb, alpha)),
        "p_transparent.png": (p_image, np.where((palette_index == 3)[..., None], 0, palette[palette_index])),
        "cmyk.tif": (Image.fromarray(np.concatenate([cmy, np.zeros((size, size, 1), np.uint8)], 2), "CMYK"), 255 - cmy),
        "bits.png": (Image.fromarray(bits).convert("1"), np.repeat(bits[..., None] * 255, 3, 2)),
        "grey.png": (Image.fromarray(grey, "L"), np.repeat(grey[..., None], 3, 2)),
        "rgb.png": (Image.fromarray(rgb, "RGB"), rgb),
    }
    for name, (image, expected) in cases.items():
        options = {"transparency": 3} if name == "p_transparent.png" else {}
        image.save(tmp_path / name, **options)
        with Image.open(tmp_path / name) as reopened:
            mode = reopened.mode
        got = folders.load_image(tmp_path / name, size).astype(np.float64)
        assert np.abs(got - expected).max() <= 1, (name, mode)
    assert Image.open(tmp_path / "grey16.png").mode == "I;16"
    assert folders.load_image(tmp_path / "grey16.png", size).mean() == pytest.approx(grey8.mean(), abs=0.01)


@pytest.mark.parametrize("mode", ["I", "F"])
def test_a_mode_without_a_fixed_range_is_refused_by_name(tmp_path, mode):
    import numpy as np

    values = _pixels(7, (8, 8), 70000, np.int32 if mode == "I" else np.float32)
    Image.fromarray(values, mode).save(tmp_path / "wide.tif")
    message = user_error(folders.load_image, tmp_path / "wide.tif", 8)
    assert "wide.tif" in message and f"pixel mode {mode} has no fixed range" in message


def noisy_folder(root: Path, per_class: int) -> Path:
    """Class folders of random-noise images of varied sizes: every image differs from every other."""
    import numpy as np

    rng = np.random.default_rng(0)
    for name in COLOURS:
        for i in range(per_class):
            (root / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (10 + i, 14, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


@pytest.mark.parametrize("workers", [0, 2])
def test_an_in_memory_folder_decodes_each_image_once_as_batches_need_it_then_caches_it(tmp_path, monkeypatch,
                                                                                        workers):
    from instill.data import BatchLoader, FillingSplit, Split, batches
    from instill.data.cache import wait_for_writes

    root, cache = noisy_folder(tmp_path / "data", per_class=8), tmp_path / "cache"
    decoded = []
    if workers == 0:  # decoded in this process: count them
        decode = folders.decode_image
        monkeypatch.setattr(folders, "decode_image", lambda path, r: decoded.append(path) or decode(path, r))
    kwargs = dict(train_dir=str(root), resolution=8, stream=False, val_fraction=0.25, test_fraction=0.25,
                  workers=workers)
    first = build_image_folder(DataContext(3, str(cache)), **kwargs)
    assert isinstance(first.train, FillingSplit) and not first.train.store.filled.any()  # nothing decoded yet
    probe = first.train.head(3)  # a probe batch: the first epoch's batches holding these rows are partly read
    epochs = []
    for epoch in range(2):
        loader = BatchLoader(first.train, 5, shuffle=True, seed=1)
        loader.set_epoch(epoch)
        epochs.append(list(loader))
    assert workers or len(decoded) == len(first.train) == len(set(decoded))  # each once, in the first epoch
    assert not cache.exists()  # written once every image is in: val and test are not yet
    held_out = [list(batches(split, 4)) for split in (first.val, first.test)]
    wait_for_writes()
    assert [p.suffix for p in cache.iterdir()] == [".safetensors"]
    monkeypatch.setattr(folders, "decode_image", lambda *a: pytest.fail("decoded again despite the cache"))
    again = build_image_folder(DataContext(3, str(cache)), **kwargs)
    assert isinstance(again.train, Split) and again.train.stored.dtype == torch.uint8
    for epoch, seen in enumerate(epochs):  # the very batches of an in-memory split of the cached pixels
        loader = BatchLoader(again.train, 5, shuffle=True, seed=1)
        loader.set_epoch(epoch)
        for (x, y), (x2, y2) in zip(seen, loader, strict=True):
            assert torch.equal(x, x2) and torch.equal(y, y2)
    assert torch.equal(probe, again.train.head(3))
    for split, seen in zip((again.val, again.test), held_out):
        assert all(torch.equal(a[0], b[0]) for a, b in zip(seen, batches(split, 4), strict=True))
    from safetensors.torch import load_file

    monkeypatch.undo()
    eager, _, _ = load_image_folder(root, 8)  # decoded up front, in listing order: what the cache holds
    assert torch.equal(load_file(next(cache.iterdir()))["x"], eager)
