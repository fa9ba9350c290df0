"""Vision subtask induction end to end: base, ablate, transfer on tiny shapes configs; bad input; shipped configs."""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from instill.data.shapes import ShapesSpec, generate
from instill.subnetworks.masks import load_mask
from instill.models import load_model
from instill.run import is_finished
from tests.conftest import CONFIGS, REPO, run_cli

SHIPPED = {"base": ["vision_shapes_fcn_base", "vision_shapes_convnet_base"],
           "ablate": ["vision_shapes_fcn_ablate", "vision_shapes_convnet_ablate"],
           "transfer": ["fcn", "convnet"]}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A working directory in which the tiny transfer config ran, its base and ablate configs first."""
    root = tmp_path_factory.mktemp("vision")
    shutil.copytree(CONFIGS, root / "configs")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        assert run_cli("transfer", "configs/tiny_shapes_transfer.yaml") == 0
    finally:
        os.chdir(cwd)
    return root


@pytest.fixture
def in_pipeline(pipeline, monkeypatch):
    monkeypatch.chdir(pipeline)
    return pipeline


def test_transfer_runs_base_and_ablate_first_and_writes_results(in_pipeline):
    for name in ("tiny_shapes_base", "tiny_shapes_ablate", "tiny_shapes_transfer"):
        assert is_finished(Path("checkpoints", name)), name
    run = Path("checkpoints/tiny_shapes_transfer")
    with open(run / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["condition", "textured_acc", "shape_only_acc", "shape_bias", "seed"]
    assert [r["condition"] for r in rows] == ["subnet", "random_init", "sampled_subnet"]
    assert {r["seed"] for r in rows} == {(run / "seed.txt").read_text().strip()}
    for row in rows:
        assert all(0 <= float(row[k]) <= 1 for k in ("textured_acc", "shape_only_acc", "shape_bias")), row
    assert (run / "shape_bias.png").stat().st_size > 0


def test_every_stage_reports_shape_bias_from_the_cue_conflict_pair(in_pipeline):
    for name in ("tiny_shapes_base", "tiny_shapes_ablate"):
        summary = json.loads(Path("checkpoints", name, "summary.json").read_text())
        assert {"textured_acc", "shape_only_acc", "shape_bias", "cue_conflict_texture_acc"} <= set(summary), name
        # shape and texture decisions are disjoint shares of the same conflict images
        assert summary["cue_conflict_acc"] + summary["cue_conflict_texture_acc"] <= 1 + 1e-9


def test_the_mask_covers_conv_and_linear_weights_and_the_subnet_stays_frozen(in_pipeline):
    base = load_model("checkpoints/tiny_shapes_base").model
    masks = load_mask("checkpoints/tiny_shapes_ablate", base)
    assert set(masks) == {"layers.0.0.weight", "layers.1.0.weight", "head.weight"}
    trained = torch.load("checkpoints/tiny_shapes_transfer/subnet-lr0.01/state.pt", weights_only=False)["model"]
    base_state = base.state_dict()
    kept, total = sum(int(m.sum()) for m in masks.values()), sum(m.numel() for m in masks.values())
    assert 0 < kept < total
    for name, mask in masks.items():
        assert torch.equal(trained[name][mask], base_state[name][mask]), name
        if not mask.all():
            assert not torch.equal(trained[name][~mask], base_state[name][~mask]), name


@pytest.mark.parametrize("batch_norm, epochs", [("inherit", 0), ("inherit", 1), ("reset", 0), ("freeze", 1)])
def test_batch_norm_statistics_follow_transfer_batch_norm_alone(in_pipeline, batch_norm, epochs):
    """With non_masked: reinit too: inherit copies the base's statistics (then they update), reset starts fresh
    ones, freeze copies the base's and keeps them through training."""
    out = f"checkpoints/bn-{batch_norm}-{epochs}"
    overrides = ["transfer.mask=checkpoints/tiny_shapes_ablate", "transfer.conditions=[subnet]",
                 "transfer.non_masked=reinit", f"transfer.batch_norm={batch_norm}", f"train.epochs={epochs}"]
    assert run_cli("transfer", "configs/tiny_shapes_transfer.yaml", "--out", out,
                   *[a for o in overrides for a in ("--set", o)]) == 0
    state = torch.load(Path(out, "subnet-lr0.01/state.pt"), weights_only=False)["model"]
    base = load_model("checkpoints/tiny_shapes_base").model.state_dict()
    means = [key for key in state if key.endswith("running_mean")]
    assert means
    for key in means:
        if batch_norm == "reset":
            assert torch.equal(state[key], torch.zeros_like(state[key])), key
        else:
            assert torch.equal(state[key], base[key]) == (epochs == 0 or batch_norm == "freeze"), key
    shutil.rmtree(out)


@pytest.mark.parametrize("stage, config, override, message", [
    ("ablate", "tiny_shapes_ablate", "data.num_classes=4", "num_classes is 4 but the base model was built for 3"),
    ("transfer", "tiny_shapes_transfer", "data.num_classes=2", "num_classes is 2 but the base model was built for 3"),
    ("transfer", "tiny_shapes_transfer", "data.resolution=24", "input_shape"),
    ("ablate", "tiny_shapes_ablate", "data.max_rotation=270",
     "max_rotation: Input should be less than or equal to 180"),
])
def test_data_that_do_not_fit_the_base_model_are_one_line_errors(in_pipeline, capsys, stage, config, override,
                                                                 message):
    before = sorted(p.name for p in Path("checkpoints").iterdir())
    out = f"checkpoints/bad-{stage}"
    upstream = {"ablate": "base=checkpoints/tiny_shapes_base",
                "transfer": "transfer.mask=checkpoints/tiny_shapes_ablate"}[stage]
    code = run_cli(stage, f"configs/{config}.yaml", "--out", out, "--set", upstream, "--set", override)
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in Path("checkpoints").iterdir()) == before  # nothing half-written


def test_a_resolution_the_model_cannot_take_is_an_error(workdir, capsys):
    code = run_cli("base", "configs/tiny_shapes_base.yaml", "--set",
                   "model={name: 'timm:vit_tiny_patch16_224', kwargs: {img_size: 224}}", "--set", "data.resolution=32")
    err = capsys.readouterr().err
    assert code == 2 and "cannot take inputs of shape (3, 32, 32)" in err, err
    assert not Path("checkpoints/tiny_shapes_base").exists()


@pytest.mark.parametrize("stage, name", [(stage, name) for stage, names in SHIPPED.items() for name in names])
def test_shipped_vision_configs_are_valid(workdir, capsys, stage, name):
    shutil.copytree(REPO / "configs", workdir / "configs", dirs_exist_ok=True)
    assert run_cli(stage, f"configs/{name}.yaml", "--validate") == 0, capsys.readouterr().err


def test_shipped_transfer_configs_chain_to_their_own_family(workdir):
    from instill.config import read_yaml

    for family in ("fcn", "convnet"):
        transfer = read_yaml(REPO / "configs" / f"{family}.yaml")
        ablate = read_yaml(REPO / transfer["transfer"]["mask"])
        assert transfer["transfer"]["mask"] == f"configs/vision_shapes_{family}_ablate.yaml"
        assert ablate["base"] == f"configs/vision_shapes_{family}_base.yaml"
        base = read_yaml(REPO / ablate["base"])
        assert (base["data"]["variant"], ablate["data"]["variant"], transfer["data"]["variant"]) == \
            ("mixed", "shape_only", "textured")
        same = {k: v for k, v in base["data"].items() if k not in ("variant", "n_train")}
        for other in (ablate, transfer):  # the three stages draw the very same kind of images
            assert {k: other["data"][k] for k in same} == same


# --------------------------------------------------------------------------------- the pose settings the configs use

def _shape_regions(images: torch.Tensor) -> torch.Tensor:
    """(N, H, W) bool: the pixels of each shape-only image whose colour differs from the corner's (the shape).

    Shapes stay inside the image and never reach its corners, so a corner pixel is always background.
    """
    corner = images[:, :, 0, 0]
    return (images != corner[:, :, None, None]).any(1)


def test_upright_centred_shapes_have_one_silhouette_per_class():
    fixed = dict(num_classes=3, max_rotation=0, position_jitter=0, min_scale=0.8, max_scale=0.8)
    sample = generate(ShapesSpec(**fixed), 60, 0)
    regions = _shape_regions(sample.shape_only)
    silhouettes = []
    for k in range(3):
        same = regions[sample.shape == k]
        assert len(same) > 1 and (same == same[0]).all(), k
        silhouettes.append(same[0])
    assert not torch.equal(silhouettes[0], silhouettes[1]) and not torch.equal(silhouettes[1], silhouettes[2])
    turned = generate(ShapesSpec(**{**fixed, "max_rotation": 180}), 60, 0)
    squares = _shape_regions(turned.shape_only)[turned.shape == 1]
    assert not (squares == squares[0]).all()  # rotation on: the square's silhouette varies


def test_position_jitter_bounds_how_far_the_shape_moves():
    def centroid_spread(jitter: float) -> float:
        sample = generate(ShapesSpec(num_classes=3, max_rotation=0, position_jitter=jitter), 200, 1)
        regions = _shape_regions(sample.shape_only).float()
        cols = torch.arange(regions.shape[-1], dtype=torch.float32)
        centroid_x = (regions.sum(1) * cols).sum(1) / regions.sum((1, 2))
        return float(centroid_x.std())

    still, half, full = centroid_spread(0.0), centroid_spread(0.5), centroid_spread(1.0)
    assert still < 0.5 < half < full
