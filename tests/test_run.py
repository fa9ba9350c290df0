"""Run directories: seeds, snapshots, replays, resume after Ctrl-C or a kill, atomic writes, the report."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from core.errors import UserError
from core.report import main as report_main
from core.report import run_status
from core.run import TIMING_PREFIX, atomic_write_json, choose_run_dir, read_metrics
from tests.conftest import REPO, python_env, run_cli

TINY = "configs/tiny_digits.yaml"


def comparable(rows):
    return [{k: v for k, v in r.items() if not k.startswith(TIMING_PREFIX)} for r in rows]


def test_seed_is_drawn_recorded_and_replayed(workdir, capsys):
    assert run_cli("base", TINY, "--out", "checkpoints/a") == 0
    assert run_cli("base", TINY, "--out", "checkpoints/b") == 0
    seeds = [int(Path(f"checkpoints/{d}/seed.txt").read_text()) for d in "ab"]
    assert seeds[0] != seeds[1]  # drawn from os.urandom
    import yaml

    snapshot = yaml.safe_load(Path("checkpoints/a/config.yaml").read_text())
    assert snapshot["reproducibility"] == {"reproduce": True, "random_seed": seeds[0], "deterministic": True}
    assert run_cli("base", "checkpoints/a/config.yaml") == 0  # a finished run is never overwritten
    replay = json.loads(Path("checkpoints/a-replay-1/replay.json").read_text())
    assert replay["matches"] is True and replay["max_abs_diff"] == 0.0
    assert "matches the original exactly" in capsys.readouterr().out
    assert run_cli("base", "checkpoints/a/config.yaml") == 0
    assert Path("checkpoints/a-replay-2/replay.json").exists()
    summary = json.loads(Path("checkpoints/a/summary.json").read_text())
    assert summary["status"] == "finished" and summary["test_acc"] > 0.5
    for name in ("config.yaml", "seed.txt", "env.json", "metrics.jsonl", "metrics.csv", "summary.json",
                 "model.safetensors", "state.pt", "curves.png"):
        assert Path("checkpoints/a", name).exists(), name
    env = json.loads(Path("checkpoints/a/env.json").read_text())
    assert env["versions"]["torch"].startswith("2.14.1") and env["end_time"]


def test_replay_detects_a_difference(workdir):
    assert run_cli("base", TINY, "--out", "checkpoints/a") == 0
    assert run_cli("base", "checkpoints/a/config.yaml", "--set", "train.optimizer.lr=0.01") == 0
    replay = json.loads(Path("checkpoints/a-replay-1/replay.json").read_text())
    assert replay["matches"] is False and replay["max_abs_diff"] > 0


def interrupt_at(monkeypatch, step: int):
    """Press Ctrl-C (send SIGINT to this process) in the middle of optimizer step ``step``."""
    from core import train

    original = train._Loop._optimizer_step

    def patched(self):
        if self.step + 1 == step:
            os.kill(os.getpid(), signal.SIGINT)
        original(self)

    monkeypatch.setattr(train._Loop, "_optimizer_step", patched)


def test_ctrl_c_then_resume_matches_an_uninterrupted_run(workdir, monkeypatch, capsys):
    seed = ["--set", "reproducibility.reproduce=true", "--set", "reproducibility.random_seed=7",
            "--set", "model.dropout=0.2"]  # dropout: the RNG state must be restored too
    assert run_cli("base", TINY, "--out", "checkpoints/whole", *seed) == 0
    with monkeypatch.context() as m:
        interrupt_at(m, 17)  # mid-epoch (13 steps per epoch)
        assert run_cli("base", TINY, "--out", "checkpoints/cut", *seed) == 130
    assert "continue with --resume" in capsys.readouterr().err
    assert run_status(Path("checkpoints/cut")) == "unfinished (resumable)"
    assert run_cli("base", TINY, "--out", "checkpoints/cut", *seed) == 2  # refuses to start over it
    assert run_cli("base", TINY, "--out", "checkpoints/cut", "--resume") == 0
    assert comparable(read_metrics("checkpoints/cut")) == comparable(read_metrics("checkpoints/whole"))
    assert run_cli("base", TINY, "--out", "checkpoints/cut", "--resume") == 2  # already finished


def test_killed_process_resumes_from_its_last_epoch(workdir):
    args = [sys.executable, str(REPO / "vision/vision_base.py"), TINY, "--set", "train.epochs=60",
            "--set", "reproducibility.reproduce=true", "--set", "reproducibility.random_seed=3"]
    whole = subprocess.run(args + ["--out", "checkpoints/whole"], env=python_env(), capture_output=True, timeout=300)
    assert whole.returncode == 0, whole.stderr
    proc = subprocess.Popen(args + ["--out", "checkpoints/killed"], env=python_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(read_metrics("checkpoints/killed")) < 5 and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(read_metrics("checkpoints/killed")) < 60, "the run finished before it could be killed"
    resumed = subprocess.run(args + ["--out", "checkpoints/killed", "--resume"], env=python_env(),
                             capture_output=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert comparable(read_metrics("checkpoints/killed")) == comparable(read_metrics("checkpoints/whole"))


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "summary.json"
    atomic_write_json(target, {"v": 1})

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        atomic_write_json(target, {"v": 2})
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]  # no temporary file left behind


def test_choose_run_dir_rules(tmp_path):
    out = tmp_path / "r"
    assert choose_run_dir(out, resume=False) == (out, None)
    with pytest.raises(UserError, match="no unfinished run"):
        choose_run_dir(out, resume=True)
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not a run directory"):
        choose_run_dir(out, resume=False)


def test_user_error_after_start_leaves_no_run_directory(workdir, monkeypatch, capsys):
    from core.stages import base

    def failing_main(ctx):
        raise UserError("something the user got wrong")

    monkeypatch.setattr(base, "main", failing_main)
    assert run_cli("base", TINY, "--out", "checkpoints/x") == 2
    assert not Path("checkpoints/x").exists() and not list(Path("checkpoints").glob(".x*"))


def test_report_lists_broken_and_unfinished_runs(workdir, capsys):
    assert run_cli("base", TINY, "--out", "checkpoints/good") == 0
    Path("checkpoints/broken").mkdir()
    (Path("checkpoints/broken") / "summary.json").write_text("{not json")
    Path("checkpoints/half").mkdir()
    (Path("checkpoints/half") / "config.yaml").write_text("x: 1\n")
    (Path("checkpoints/half") / "seed.txt").write_text("5\n")
    torch.save({}, Path("checkpoints/half") / "state.pt")
    capsys.readouterr()
    assert report_main(["checkpoints", "--plot"]) == 0
    out = capsys.readouterr().out
    assert "finished" in out and "broken" in out and "unfinished (resumable)" in out
    assert "test_acc" in out and Path("checkpoints/good/curves.png").exists()
    assert report_main(["nowhere"]) == 2
