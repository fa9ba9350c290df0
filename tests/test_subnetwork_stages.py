"""End to end: base -> ablate -> transfer on tiny arithmetic configs, upstream configs run first, bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from core.masks import load_mask
from core.models import load_model
from core.run import is_finished, read_metrics
from tests.conftest import run_cli


@pytest.fixture
def transferred(workdir):
    assert run_cli("transfer", "configs/tiny_math_transfer.yaml") == 0
    return workdir


def test_transfer_runs_its_upstream_configs_first(transferred, capsys):
    for name in ("tiny_math_base", "tiny_math_ablate", "tiny_math_transfer"):
        assert is_finished(Path("checkpoints", name)), name
    with open("checkpoints/tiny_math_transfer/accuracy_logs.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["condition"] for r in rows] == ["subnet", "full_model", "random_init", "sampled_subnet"] * 2
    assert set(rows[0]) == {"n_disambiguation", "condition", "lr", "best_eval_acc", "test_acc", "seed"}
    assert Path("checkpoints/tiny_math_transfer/accuracy_vs_n.png").exists()
    snapshot = Path("checkpoints/tiny_math_transfer/config.yaml").read_text()
    assert "mask: checkpoints/tiny_math_ablate" in snapshot  # the replay uses the very same upstream run


def test_ablation_logs_and_mask_artifact(transferred):
    rows = read_metrics("checkpoints/tiny_math_ablate")
    assert [r["temperature"] for r in rows] == sorted(r["temperature"] for r in rows)
    assert {"val_acc", "density", "mean_logit", "density/transformer.h.0.attn.c_attn.weight"} <= set(rows[0])
    meta = json.loads(Path("checkpoints/tiny_math_ablate/mask.json").read_text())
    assert 0 < meta["density"] < 1 and meta["base_run"] == "checkpoints/tiny_math_base"
    base, _, _ = load_model("checkpoints/tiny_math_base")
    masks = load_mask("checkpoints/tiny_math_ablate", base)
    assert all(m.dtype == torch.bool for m in masks.values())
    assert Path("checkpoints/tiny_math_ablate/mask_density.png").exists()


def test_subnet_weights_stay_frozen_at_the_base_values(transferred):
    base, _, _ = load_model("checkpoints/tiny_math_base")
    masks = load_mask("checkpoints/tiny_math_ablate", base)
    trained = torch.load("checkpoints/tiny_math_transfer/n40-subnet-lr0.003/state.pt", weights_only=False)["model"]
    base_state = base.state_dict()
    for name, mask in masks.items():
        assert torch.equal(trained[name][mask], base_state[name][mask]), name
        assert not torch.equal(trained[name][~mask], base_state[name][~mask]), name


def test_replaying_the_transfer_matches(transferred, capsys):
    assert run_cli("transfer", "checkpoints/tiny_math_transfer/config.yaml") == 0
    replay = json.loads(Path("checkpoints/tiny_math_transfer-replay-1/replay.json").read_text())
    assert replay["matches"] is True, replay


@pytest.mark.parametrize("override, message", [
    ("transfer.conditions=[subnet, random]", "unknown condition 'random'"),
    ("transfer.n_disambiguation=[]", "transfer.n_disambiguation"),
    ("transfer.mask=nowhere", "neither a run directory nor a config file"),
])
def test_transfer_bad_input(workdir, capsys, override, message):
    assert run_cli("transfer", "configs/tiny_math_transfer.yaml", "--set", override) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not Path("checkpoints").exists()


def test_ablate_bad_input(workdir, capsys):
    assert run_cli("base", "configs/tiny_math_base.yaml") == 0
    capsys.readouterr()
    cases = [("mask.layers=[Conv2d]", "matches no maskable weight"),
             ("data.max=30", "vocab_size"),
             ("mask.methd=magnitude", "mask.methd")]
    for override, message in cases:
        assert run_cli("ablate", "configs/tiny_math_ablate.yaml", "--set", override) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert not Path("checkpoints/tiny_math_ablate").exists()


def test_sequence_loss_scope_is_the_hugging_face_causal_lm_loss():
    from core.data import DataContext
    from core.registry import DATASETS, MODELS
    from core.stages import make_loss

    data = DATASETS.build("arithmetic", DataContext(seed=0), {"max": 20, "n_train": 64})
    model = MODELS.build("gpt2", data.info, {"n_layer": 1, "n_embd": 16, "n_head": 2}).eval()
    x, y = data.train.x[:32], data.train.y[:32]
    ours, _ = make_loss("sequence")(model, (x, y))
    assert ours.item() == pytest.approx(model(x, labels=x).loss.item(), rel=1e-5)
    answer, _ = make_loss("answer")(model, (x, y))
    logits = model(x).logits[:, 2]
    assert answer.item() == pytest.approx(torch.nn.functional.cross_entropy(logits, x[:, 3]).item(), rel=1e-5)
