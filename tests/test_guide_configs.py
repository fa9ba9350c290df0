"""The shipped guidance configs: each validates, its layer map pairs the layers its header documents, and the
copy-paste and language-modelling presets run end to end when shrunk with --set."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from instill.registry import MODELS
from instill.run import read_metrics
from instill.stages import build_data, load_stage_config
from instill.guidance.guide import _alignment, _sample
from tests.conftest import REPO, run_cli

SHIPPED = REPO / "configs"
GUIDE_CONFIGS = ["guide_copy_paste.yaml", "guide_parity.yaml", "guide_deep_fcn.yaml", "guide_lm.yaml"]
SMALL_DATA = {"copy_paste": ["data.n_train=64", "data.n_val=16", "data.n_test=16"],
              "parity": ["data.n_train=64", "data.n_val=16", "data.n_test=16"],
              "mnist5k": ["data.limit=64"], "digits": ["data.limit=64"], "shapes": ["data.n_train=64"],
              "text": ["data.seq_len=8"]}

# Each preset's pairs (target~guide), as its header documents them.
EXPECTED_PAIRS = {
    "guide_copy_paste.yaml": ["layers.0~layer@1", "layers.1~layer@3"],
    "guide_parity.yaml": ["layer.self_attn~layers.1"],
    # the original's stretch of 9 guide maps over 24 target layers: every 2-3 layers, banker's rounding at 11.5
    "guide_deep_fcn.yaml": ["layers.0.0~stem", "layers.3.0~layers.0", "layers.6.0~layers.1", "layers.9.0~layers.2",
                            "layers.12.0~layers.3", "layers.14.0~layers.4", "layers.17.0~layers.5",
                            "layers.20.0~layers.6", "layers.23.0~layers.7"],
    "guide_lm.yaml": ["layers.0~layers.1", "layers.1~layers.3"],
}


@pytest.mark.parametrize("name", GUIDE_CONFIGS)
def test_shipped_guide_config_validates(name, capsys):
    assert run_cli("guide", str(SHIPPED / name), "--validate") == 0
    assert "valid guide config" in capsys.readouterr().out


def test_parity_guide_base_config_validates():
    cfg = load_stage_config(SHIPPED / "guide_parity_rnn_base.yaml", "base")
    parity = load_stage_config(SHIPPED / "guide_parity.yaml", "guide")
    assert cfg.model.name == "rnn_classifier"
    assert cfg.data.model_dump() == parity.data.model_dump()  # the guide learned the very task it guides


def _guide_architecture(cfg) -> tuple[str, dict]:
    """The guide's registered name and options: its own section, or the trained guide's base config."""
    if cfg.guidance.guide is not None:
        return cfg.guidance.guide.name, cfg.guidance.guide.params
    base = load_stage_config(REPO / cfg.guidance.guide_run, "base")
    return base.model.name, base.model.params


@pytest.mark.parametrize("name", GUIDE_CONFIGS)
def test_shipped_layer_maps_resolve(name):
    """Every named or typed layer exists in both models and the map gives the pairs the config's header names."""
    torch.manual_seed(0)
    data_name = load_stage_config(SHIPPED / name, "guide").data.name
    cfg = load_stage_config(SHIPPED / name, "guide", SMALL_DATA[data_name])
    data = build_data(cfg, seed=0)
    target = MODELS.build(cfg.model.name, data.info, cfg.model.params)
    guide_name, guide_params = _guide_architecture(cfg)
    guide = MODELS.build(guide_name, data.info, guide_params)
    alignment = _alignment(cfg.guidance, target, guide, _sample(data, torch.device("cpu")))
    pairs = [f"{p.target}~{p.guide}" for p in alignment.pairs]
    alignment.close()
    assert pairs == EXPECTED_PAIRS[name]


def run_shrunk(name: str, shrink: list[str]) -> tuple[Path, dict[str, dict[str, str]]]:
    """Run a shipped preset with ``--set`` overrides; its run directory and results.csv rows by condition."""
    root = Path("checkpoints") / Path(name).stem
    args = [str(SHIPPED / name), "--out", str(root)]
    for item in shrink:
        args += ["--set", item]
    assert run_cli("guide", *args) == 0
    with open(root / "results.csv") as f:
        return root, {r["condition"]: r for r in csv.DictReader(f)}


def test_copy_paste_preset_runs_shrunk(workdir):
    """The shipped copy-paste preset, shrunk, runs both conditions from one start and logs every pair's CKA."""
    root, rows = run_shrunk("guide_copy_paste.yaml", [
        "data.n_train=128", "data.n_val=32", "data.n_test=32", "data.min_len=3", "data.max_len=5", "train.epochs=2",
        "train.batch_size=32"])
    assert set(rows) == {"unguided", "guided_untrained"}
    assert all(0.0 <= float(r["test_symbols_acc"]) <= 1.0 for r in rows.values())
    guided = read_metrics(root / "guided_untrained")
    sims = [k for k in guided[-1] if k.startswith("sim/")]
    assert sims and all(0.0 <= guided[-1][k] <= 1.0 + 1e-6 for k in sims)
    assert guided[-1]["align_loss"] > 0


def test_language_model_preset_runs_shrunk_on_the_shipped_corpus(workdir):
    """The LM preset, shrunk: both conditions on the default text file, perplexity in results.csv, pairs logged."""
    root, rows = run_shrunk("guide_lm.yaml", [
        "data.seq_len=12", "model.hidden_size=16", "model.embed_dim=16", "guidance.guide.d_model=16",
        "guidance.guide.dim_feedforward=16", "train.epochs=1", "train.max_steps=3", "train.batch_size=16"])
    assert set(rows) == {"unguided", "guided_untrained"}
    vocab = 54  # the shipped corpus's words, line break, <pad> and <unk>
    assert all(1.0 < float(r["test_perplexity"]) < 2 * vocab for r in rows.values())
    guided = read_metrics(root / "guided_untrained")[-1]
    assert guided["step"] == 3 and {"sim/layers.0~layers.1", "sim/layers.1~layers.3"} <= set(guided)
