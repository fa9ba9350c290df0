"""Shipped configs replay bit for bit on the CPU (cut short with --set): run, then rerun the snapshot."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import REPO, run_cli


@pytest.mark.parametrize("script_stage, config, cut", [
    ("base", "vision_base_digits.yaml", ["train.epochs=1", "data.limit=300"]),
    ("base", "math_2l_base.yaml", ["data.n_train=1000", "data.n_val=100", "data.n_test=100", "train.epochs=1",
                                   "train.eval_every=5"]),
    ("base", "vision_shapes_fcn_base.yaml", ["data.n_train=300", "data.n_val=60", "data.n_test=60",
                                             "train.epochs=1"]),
])
def test_a_shipped_config_replays_exactly(tmp_path, monkeypatch, capsys, script_stage, config, cut):
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    settings = [arg for item in cut for arg in ("--set", item)] + ["--set", "train.threads=1"]
    assert run_cli(script_stage, f"configs/{config}", *settings) == 0
    run = Path("checkpoints") / Path(config).stem
    assert run_cli(script_stage, str(run / "config.yaml")) == 0
    replay = json.loads(Path(f"{run}-replay-1/replay.json").read_text())
    assert replay["matches"] is True and replay["max_abs_diff"] == 0.0, replay
