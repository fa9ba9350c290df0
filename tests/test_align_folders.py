"""The align stage on CIFAR-10 and KMNIST from local folders (never downloaded): tiny synthetic folders in the exact
on-disk formats the readers accept (torchvision's CIFAR-10 pickle batches; an ImageFolder of 28x28 grayscale
PNGs, as KMNIST exported to images), ``ntk_cnn`` in its cifar and kmnist shapes, one epoch; a missing folder is one
line, exit code 2, nothing written; no network connection is attempted."""

from __future__ import annotations

import csv
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import run_cli
from tests.test_zoo_sources import _write_cifar10

CIFAR = """stage: align
data: {name: cifar10, root: data}
model: {name: ntk_cnn, shape: cifar, width: 2}
train: {epochs: 1, batch_size: 18, eval_batch_size: 100, optimizer: {name: SGD, lr: 2.0}, progress: false,
        threads: 1, rule_options: {dfa: {feedback: pooled}}}
align: {rules: [backprop, align_ada, dfa]}
"""

KMNIST = """stage: align
data: {name: image_folder, train_dir: kmnist, resolution: 28, val_fraction: 0.25, test_fraction: 0.25, workers: 0}
model: {name: ntk_cnn, shape: kmnist, width: 2}
train: {epochs: 1, batch_size: 4, eval_batch_size: 100, optimizer: {name: SGD, lr: 2.0}, progress: false,
        threads: 1}
align: {rules: [align_zero, fa], data_limits: [4, 8]}
"""


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Any attempt to open a network connection fails the test (nothing may download)."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"a network connection was attempted: {args}")

    for name in ("connect", "connect_ex"):
        monkeypatch.setattr(socket.socket, name, refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def random_image_folder(root: Path, classes: int = 3, per_class: int = 8, size: int = 28, mode: str = "L") -> None:
    """``root/<class>/<i>.png`` of random pixels: every image distinct (solid colours give a batch two or three
    distinct inputs, after which a narrow net's batch-statistics norm can leave a layer's update exactly zero)."""
    rng = np.random.default_rng(0)
    shape = (size, size) if mode == "L" else (size, size, 3)
    for c in range(classes):
        (root / str(c)).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode).save(root / str(c) / f"{i}.png")


def test_align_on_cifar10_batches_with_the_cifar_shaped_cnn(workdir):
    _write_cifar10(workdir / "data", n=12)  # 60 training images (54 train, 6 val), 12 test images
    Path("cifar.yaml").write_text(CIFAR)
    assert run_cli("align", "cifar.yaml") == 0
    rows = _rows("checkpoints/cifar/results.csv")
    assert [r["rule"] for r in rows] == ["backprop", "align_ada", "dfa"]
    layers = [f"blocks.{i}.layer" for i in range(7)] + ["head"]  # the original's 7 CIFAR convs and the readout
    for r in rows:
        assert float(r["test_acc"]) * 12 == pytest.approx(round(float(r["test_acc"]) * 12))  # test_batch's 12
        assert np.isfinite(float(r["test_loss"]))
        assert all(bool(r[f"align/{layer}"]) == (r["rule"] == "backprop") for layer in layers)
    assert all(0 < float(rows[0][f"align/{layer}"]) <= 1 for layer in layers)


def test_align_on_a_kmnist_image_folder_with_data_limits(workdir):
    random_image_folder(workdir / "kmnist")  # 24 grayscale 28x28 images: 12 train, 6 val, 6 test
    Path("kmnist.yaml").write_text(KMNIST)
    assert run_cli("align", "kmnist.yaml") == 0
    rows = _rows("checkpoints/kmnist/results.csv")
    assert [(r["rule"], r["data_limit"]) for r in rows] == [("align_zero", "4"), ("fa", "4"), ("align_zero", "8"),
                                                            ("fa", "8")]
    for r in rows:
        assert np.isfinite(float(r["test_loss"])) and 0 <= float(r["test_acc"]) <= 1
    # the limit is a seeded subset of the training split: 4 images are 1 step, 8 images 2 steps
    from instill.run import read_metrics

    assert read_metrics(Path("checkpoints/kmnist/align_zero-lr2-n4"))[-1]["step"] == 1
    assert read_metrics(Path("checkpoints/kmnist/fa-lr2-n8"))[-1]["step"] == 2


@pytest.mark.parametrize("data, message", [
    ("{name: cifar10, root: nowhere}", "CIFAR folder nowhere/cifar-10-batches-py not found"),
    ("{name: image_folder, train_dir: nowhere, resolution: 28}", "data.train_dir 'nowhere' does not exist"),
])
def test_a_missing_local_folder_is_one_line_and_writes_nothing(workdir, capsys, data, message):
    Path("cifar.yaml").write_text(CIFAR)
    assert run_cli("align", "cifar.yaml", "--set", f"data={data}") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not Path("checkpoints").exists() and not Path("nowhere").exists()
