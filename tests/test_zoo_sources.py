"""The CIFAR model zoo, the original authors' weights, natural-image data and the model-source loader."""

from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from instill.data import DataContext, DatasetInfo
from instill.errors import UserError
from instill.registry import DATASETS, MODELS
from instill.compare.sources import guess_architecture, load_model_source, read_state_dict
from tests.conftest import run_cli

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "drfrankenstein"
TINY10 = {seed: str(FIXTURES / f"Tiny10/CIFAR10/in{seed}-gn{seed}/110000.pt") for seed in (0, 1, 10)}
RESNET20 = str(FIXTURES / "ResNet20_w1/in0-gn0/110000.pt")
CIFAR_INFO = {"input_shape": (3, 32, 32), "num_classes": 10}


@pytest.fixture(scope="module")
def crops():
    return DATASETS.build("crops", DataContext(seed=0), {"n_train": 256, "n_val": 8, "n_test": 8})


@pytest.mark.parametrize("name, params, count", [("tiny10", {}, 86_778), ("nbn_tiny10", {}, 86_138),
                                                 ("lenet", {}, 62_006), ("resnet20", {"width": 1}, 272_474),
                                                 ("resnet20", {"width": 2}, None)])
def test_zoo_is_sized_by_the_data(name, params, count):
    model = MODELS.build(name, CIFAR_INFO, params)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    if count is not None:
        assert sum(p.numel() for p in model.parameters()) == count
    gray = MODELS.build(name, {"input_shape": (1, 28, 28), "num_classes": 7}, params)
    assert gray(torch.zeros(2, 1, 28, 28)).shape == (2, 7)


def test_tiny10_layer_shapes_are_the_originals():
    from instill.compare.capture import probe

    shapes = probe(MODELS.build("tiny10", CIFAR_INFO, {}), [f"bn{i}" for i in range(1, 9)], torch.zeros(2, 3, 32, 32))
    assert [s[1:] for s in shapes.values()] == [(16, 30, 30), (16, 28, 28), (32, 13, 13), (32, 11, 11), (32, 9, 9),
                                                (64, 4, 4), (64, 2, 2), (64, 2, 2)]


def test_tiny10_refuses_images_too_small():
    with pytest.raises(UserError, match="at least"):
        MODELS.build("tiny10", {"input_shape": (3, 8, 8), "num_classes": 10}, {})


def test_crops_are_seeded_label_free_natural_images(crops):
    again = DATASETS.build("crops", DataContext(seed=0), {"n_train": 256, "n_val": 8, "n_test": 8})
    other = DATASETS.build("crops", DataContext(seed=1), {"n_train": 256, "n_val": 8, "n_test": 8})
    assert torch.equal(crops.train.x, again.train.x) and not torch.equal(crops.train.x, other.train.x)
    assert crops.train.x.shape == (256, 3, 32, 32) and (crops.train.y == -1).all()
    assert crops.info == DatasetInfo((3, 32, 32), num_classes=10, labeled=False) and crops.info.modality == "image"
    assert not torch.equal(crops.train.x, crops.val.x[:1].expand(256, -1, -1, -1))


def _predictions(seed, x):
    loaded = load_model_source({"name": "tiny10", "weights": TINY10[seed]}, CIFAR_INFO)
    assert not loaded.model.training and not any(p.requires_grad for p in loaded.model.parameters())
    with torch.no_grad():
        return loaded.model(x).argmax(1)


def test_the_original_tiny10_weights_load_and_agree_across_seeds(crops):
    """The authors' networks (84.5% CIFAR-10 validation accuracy in their training_log.csv) agree with each other on
    natural crops about twice as often as chance; a randomly initialised Tiny10 does not."""
    x = crops.train.x
    p0, p1, p10 = (_predictions(seed, x) for seed in (0, 1, 10))
    agreement = lambda a, b: (a == b).float().mean().item()  # noqa: E731
    torch.manual_seed(0)
    fresh = load_model_source({"name": "tiny10"}, CIFAR_INFO).model
    with torch.no_grad():
        p_fresh = fresh(x).argmax(1)
    def independent(a, b):  # the agreement of two independent predictors with these class frequencies
        return (torch.bincount(a, minlength=10).float() @ torch.bincount(b, minlength=10).float()).item() / len(a) ** 2

    for other in (p1, p10):  # measured on 256 crops of seed 0: 0.41 and 0.33 against 0.18 by chance
        assert agreement(p0, other) > max(0.25, 1.5 * independent(p0, other))
    assert agreement(p0, p_fresh) < 0.2
    assert len(p0.unique()) >= 5  # not one class for everything
    log = (FIXTURES / "Tiny10/CIFAR10/in0-gn0/training_log.csv").read_text().splitlines()
    assert float(log[-1].split(",")[2]) > 0.84


def test_resnet20_weights_load_and_architecture_is_guessed():
    loaded = load_model_source({"name": "resnet20", "width": 1, "weights": RESNET20}, CIFAR_INFO)
    assert loaded.kind == "weights" and "resnet20" in loaded.label
    assert guess_architecture(read_state_dict(RESNET20), CIFAR_INFO) == {"name": "resnet20", "width": 1}
    assert guess_architecture(read_state_dict(TINY10[0]), CIFAR_INFO) == {"name": "tiny10"}


def test_weights_of_another_architecture_name_the_first_mismatching_key():
    with pytest.raises(UserError, match=r"first mismatching key 'conv1.bias' is missing from the file"):
        load_model_source({"name": "tiny10", "weights": RESNET20}, CIFAR_INFO, key="model_a")
    with pytest.raises(UserError, match=r"first mismatching key 'conv1.weight' has shape \(16, 3, 3, 3\) in the "
                                        r"file, \(32, 3, 3, 3\)"):
        load_model_source({"name": "resnet20", "width": 2, "weights": RESNET20}, CIFAR_INFO)
    with pytest.raises(UserError, match=r"'bn1.weight' in the file is not in the model"):
        load_model_source({"name": "nbn_tiny10", "weights": TINY10[0]}, CIFAR_INFO)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_hostile_weights_files_are_refused_not_run(tmp_path):
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(Path(TINY10[0]).read_bytes()[:1000])
    with pytest.raises(UserError, match="cannot read"):
        load_model_source({"name": "tiny10", "weights": str(truncated)}, CIFAR_INFO)
    hostile = tmp_path / "hostile.pt"
    hostile.write_bytes(pickle.dumps(_Boom()))
    with pytest.raises(UserError, match="cannot read"):
        load_model_source({"name": "tiny10", "weights": str(hostile)}, CIFAR_INFO)
    assert not (tmp_path / "boom").exists()
    with pytest.raises(UserError, match="not found"):
        load_model_source({"name": "tiny10", "weights": str(tmp_path / "nope.pt")}, CIFAR_INFO)


class _Boom:
    def __reduce__(self):
        return (Path.touch, (Path("boom"),))


def test_source_section_is_validated():
    with pytest.raises(UserError, match="either run"):
        load_model_source({"name": "tiny10", "run": "x"}, CIFAR_INFO)
    with pytest.raises(UserError, match=r"model_a: unknown key 'widht' \(did you mean 'width'"):
        load_model_source({"name": "resnet20", "widht": 2}, CIFAR_INFO, key="model_a")
    with pytest.raises(UserError, match="does not go with run"):
        load_model_source({"run": "x", "weights": "y.pt"}, CIFAR_INFO)
    with pytest.raises(UserError, match="not a directory"):
        load_model_source({"run": "no/such/run"}, CIFAR_INFO)


# ----------------------------------------------------------------------------------------------------- run dirs

@pytest.fixture(scope="module")
def shapes_runs(tmp_path_factory):
    """base -> ablate -> transfer of the tiny shapes configs (the transfer config runs its upstream first)."""
    import os
    import shutil

    from tests.conftest import CONFIGS

    root = tmp_path_factory.mktemp("runs")
    shutil.copytree(CONFIGS, root / "configs")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        assert run_cli("transfer", "configs/tiny_shapes_transfer.yaml", "--set",
                       "transfer.conditions=[subnet]") == 0
        data = DATASETS.build("shapes", DataContext(seed=0), {"num_classes": 3, "resolution": 16, "n_train": 8,
                                                              "n_val": 4, "n_test": 4})
    finally:
        os.chdir(cwd)
    return root / "checkpoints", data.info


def test_every_stage_run_directory_is_a_model_source(shapes_runs):
    from instill.subnetworks.masks import load_mask
    from instill.models import load_model

    runs, info = shapes_runs
    base = load_model_source({"run": str(runs / "tiny_shapes_base")}, info)
    assert base.kind == "base"
    ablated = load_model_source({"run": str(runs / "tiny_shapes_ablate")}, info)
    masks = load_mask(runs / "tiny_shapes_ablate", load_model(runs / "tiny_shapes_base").model)
    weights = dict(ablated.model.named_parameters())
    for name, mask in masks.items():
        assert (weights[name][~mask] == 0).all() and torch.equal(weights[name][mask],
                                                                  dict(base.model.named_parameters())[name][mask])
    with pytest.raises(UserError, match="sub-runs with a model: subnet-lr"):
        load_model_source({"run": str(runs / "tiny_shapes_transfer")}, info)
    sub_run = next((runs / "tiny_shapes_transfer").glob("subnet-lr*"))
    sub = load_model_source({"run": str(sub_run)}, info)
    assert sub.kind == "run"
    other = dataclasses.replace(info, num_classes=5, class_names=None)
    with pytest.raises(UserError, match="num_classes"):
        load_model_source({"run": str(runs / "tiny_shapes_base")}, other)


# ----------------------------------------------------------------------------------------------------- CIFAR

def _write_cifar10(root: Path, n: int = 20) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": list(rng.integers(0, 10, n)),
                 b"batch_label": b"x"}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    return folder


def test_cifar10_reads_torchvisions_layout(tmp_path):
    _write_cifar10(tmp_path)
    data = DATASETS.build("cifar10", DataContext(seed=0), {"root": str(tmp_path), "val_fraction": 0.1})
    assert len(data.train) == 90 and len(data.val) == 10 and len(data.test) == 20
    assert data.train.x.shape[1:] == (3, 32, 32) and data.info.num_classes == 10


def test_cifar_folder_missing_or_malformed_is_one_line(tmp_path):
    with pytest.raises(UserError, match="CIFAR folder .* not found"):
        DATASETS.build("cifar10", DataContext(seed=0), {"root": str(tmp_path)})
    folder = _write_cifar10(tmp_path)
    (folder / "data_batch_3").write_bytes(b"garbage")
    with pytest.raises(UserError, match="data_batch_3: not a CIFAR batch"):
        DATASETS.build("cifar10", DataContext(seed=0), {"root": str(tmp_path)})
    (folder / "data_batch_3").write_bytes(pickle.dumps(_Boom()))
    with pytest.raises(UserError, match="refused global"):
        DATASETS.build("cifar10", DataContext(seed=0), {"root": str(tmp_path)})
    (folder / "data_batch_3").write_bytes(pickle.dumps({b"data": np.zeros((4, 10), np.uint8), b"labels": [0] * 4}))
    with pytest.raises(UserError, match="N x 3072"):
        DATASETS.build("cifar10", DataContext(seed=0), {"root": str(tmp_path)})
    with pytest.raises(UserError, match="cifar-100-python"):
        DATASETS.build("cifar100", DataContext(seed=0), {"root": str(tmp_path)})


# ----------------------------------------------------------------------------------------------------- layers CLI

def test_layers_lists_names_and_shapes_for_names_weights_files_and_run_dirs(shapes_runs, capsys):
    from instill.layers import main

    assert main(["tiny10"]) == 0
    out = capsys.readouterr().out
    assert "bn3    BatchNorm2d  32x13x13" in out and "fc     Linear       10" in out
    assert main([RESNET20]) == 0
    out = capsys.readouterr().out
    assert out.startswith("resnet20 <- ") and "layer2.0.downsample.1" in out
    runs, _ = shapes_runs
    assert main([str(runs / "tiny_shapes_base")]) == 0
    assert "layers.0" in capsys.readouterr().out
    assert main([TINY10[0], "--model", "resnet20"]) == 2
    assert "first mismatching key" in capsys.readouterr().err
    assert main(["tinny10"]) == 2
    assert "did you mean 'tiny10'" in capsys.readouterr().err


def test_packaged_images_are_what_scikit_learn_loads_without_importing_it():
    """digits and crops read the files scikit-learn ships directly (importing it costs more than a small run)."""
    import subprocess
    import sys

    from sklearn.datasets import load_digits, load_sample_images

    from instill.data.images import digits_arrays
    from instill.data.natural import _photographs

    images, labels = digits_arrays()
    reference = load_digits()
    assert np.array_equal(images, reference.images) and np.array_equal(labels, reference.target)
    photographs = torch.stack([torch.from_numpy(np.array(p)).permute(2, 0, 1) for p in load_sample_images().images])
    assert torch.equal(_photographs(), photographs)
    code = ("import sys; from instill.data import DataContext; from instill.registry import DATASETS; "
            "from instill.data import images, natural; DATASETS.build('digits', DataContext(seed=0), {}); "
            "DATASETS.build('crops', DataContext(seed=0), {'n_train': 4, 'n_val': 4, 'n_test': 4}); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('sklearn', 'scipy', 'pandas')))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"


def test_a_missing_packaged_file_is_one_line():
    from instill.data.images import packaged_file

    with pytest.raises(UserError, match=r"digits: .*nope.csv not found \(is sklearn installed\?\)"):
        packaged_file("digits", "sklearn", "datasets", "nope.csv")
    with pytest.raises(UserError, match=r"needs the no_such_package_xyz package, which is not installed"):
        packaged_file("digits", "no_such_package_xyz", "a.csv")
