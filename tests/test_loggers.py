"""Optional loggers: TensorBoard event files and W&B offline runs fed from the rows of metrics.jsonl."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from tests.conftest import REPO, run_cli


def test_an_enabled_logger_that_is_not_installed_stops_before_anything_is_written(workdir, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    assert run_cli("base", "configs/tiny_digits.yaml", "--set", "logging.tensorboard=true") == 2
    err = capsys.readouterr().err
    assert err == ("error: logging.tensorboard: true needs the tensorboard package, which is not installed "
                   f"(pip install -e '{REPO}[tensorboard]')\n")  # from far away: the checkout's path
    assert not Path("checkpoints").exists()


def test_tensorboard_events_hold_the_metrics_rows(workdir):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert run_cli("base", "configs/tiny_digits.yaml", "--set", "logging.tensorboard=true") == 0
    rows = [json.loads(line) for line in Path("checkpoints/tiny_digits/metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator("checkpoints/tiny_digits/tensorboard")
    events.Reload()
    for key in ("val_acc", "train_loss", "lr"):
        logged = [(e.step, e.value) for e in events.Scalars(key)]
        assert logged == [(row["step"], pytest.approx(row[key], rel=1e-6)) for row in rows], key


def test_wandb_offline_run_is_written_into_the_run_directory(workdir, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    assert run_cli("base", "configs/tiny_digits.yaml", "--set", "logging.wandb=true") == 0
    assert list(Path("checkpoints/tiny_digits/wandb").glob("offline-run-*/run-*.wandb"))
