"""Streamed data: a map-style Dataset read by a DataLoader with worker processes is seeded, evaluated and resumed
exactly like the in-memory path (image folders stream by default)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from instill.data import BatchLoader, Split, StreamSplit, batches
from instill.run import read_metrics
from tests.conftest import run_cli
from tests.test_folders import _folder_config
from tests.test_run import SEEDED, comparable, interrupt_at


class Items(torch.utils.data.Dataset):
    def __init__(self, split: Split):
        self.split = split

    def __len__(self):
        return len(self.split)

    def __getitem__(self, i):
        return self.split.x[i], int(self.split.y[i])


def test_a_stream_gives_the_in_memory_batches_with_workers_and_from_any_batch():
    split = Split(torch.randn(50, 3), torch.arange(50) % 4)
    stream = StreamSplit(Items(split), split.y, workers=2)
    memory, streamed = (BatchLoader(s, 8, shuffle=True, seed=5) for s in (split, stream))
    for loader in (memory, streamed):
        loader.set_epoch(3)
    for (i, a), (j, b) in zip(memory.iter_from(0), streamed.iter_from(0), strict=True):
        assert i == j and torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    resumed = [i for i, _ in streamed.iter_from(4)]
    assert resumed == [4, 5, 6]
    for (xa, ya), (xb, yb) in zip(batches(split, 16), batches(stream, 16), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_a_streamed_image_folder_trains_exactly_as_the_in_memory_one(workdir, tmp_path):
    config = str(_folder_config(tmp_path))
    assert run_cli("base", config, "--out", "checkpoints/memory", "--set", "data.stream=false", *SEEDED) == 0
    assert run_cli("base", config, "--out", "checkpoints/stream", "--set", "data.workers=2", *SEEDED) == 0
    assert comparable(read_metrics("checkpoints/stream")) == comparable(read_metrics("checkpoints/memory"))
    def summary(run: str) -> dict:
        figures = json.loads(Path(f"checkpoints/{run}/summary.json").read_text())
        figures.pop("duration_s")
        return figures

    assert summary("stream") == summary("memory") and "test_acc" in summary("stream")


def test_a_streamed_run_resumes_mid_epoch_to_the_same_metrics(workdir, tmp_path, monkeypatch):
    config = str(_folder_config(tmp_path))
    settings = ["--set", "train.epochs=2", "--set", "train.batch_size=4", *SEEDED]
    assert run_cli("base", config, "--out", "checkpoints/whole", *settings) == 0
    with monkeypatch.context() as m:
        interrupt_at(m, 5)  # 6 batches per epoch: mid-epoch 1
        assert run_cli("base", config, "--out", "checkpoints/cut", *settings) == 130
    assert run_cli("base", config, "--out", "checkpoints/cut", "--resume") == 0
    assert comparable(read_metrics("checkpoints/cut")) == comparable(read_metrics("checkpoints/whole"))


def test_a_streamed_folder_decodes_lazily_and_a_stitch_reads_each_image_a_bounded_number_of_times(
        workdir, tmp_path, monkeypatch):
    """Building a streamed folder decodes nothing; a probe batch decodes its own items; the stitch stage, whose
    activation cache used to take every split's pixels whole for every chunk, decodes each image a few times."""
    import yaml

    from instill.data import DataContext
    from instill.data import folders
    from tests.test_folders import class_folder

    decoded = []
    real = folders.decode_image
    monkeypatch.setattr(folders, "decode_image", lambda path, r: decoded.append(path) or real(path, r))
    root = class_folder(tmp_path / "train", per_class=10)  # 30 images
    data = folders.build_image_folder(DataContext(seed=1), train_dir=str(root), resolution=8, workers=0)
    assert decoded == [] and len(data.train) + len(data.val) + len(data.test) == 30
    assert data.train.head(3).shape == (3, 3, 8, 8) and len(decoded) == 3
    decoded.clear()
    convnet = {"name": "convnet", "channels": [4, 4], "strides": [2, 1]}
    config = {"data": {"name": "image_folder", "train_dir": str(root), "resolution": 8, "workers": 0},
              "stitch": {"front": convnet, "end": convnet, "front_layers": ["layers.0.1"], "end_layers": ["layers.1.1"],
                         "measures": ["cka"], "similarity_samples": 4},
              "train": {"epochs": 2, "batch_size": 4, "eval_batch_size": 2, "threads": 1, "progress": False}}
    (tmp_path / "stitch.yaml").write_text(yaml.safe_dump(config))
    assert run_cli("stitch", str(tmp_path / "stitch.yaml"), "--out", "checkpoints/stitch", *SEEDED) == 0
    # every image once for each split's cached activations, plus probe batches: never a split per chunk
    assert 0 < len(decoded) <= 2 * 30, len(decoded)
