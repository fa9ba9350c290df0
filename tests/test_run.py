"""Run directories: seeds, snapshots, replays, resume after Ctrl-C or a kill, atomic writes, the report."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from instill.errors import UserError
from instill.report import main as report_main
from instill.report import run_status
from instill.run import TIMING_PREFIX, claim_run_dir, read_metrics
from instill.files import atomic_write_json
from instill.seeds import seed_everything
from tests.conftest import REPO, python_env, replace_stage_main, run_cli

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
                 "model.safetensors", "model.json", "last.safetensors", "last.json", "state.pt", "curves.png"):
        assert Path("checkpoints/a", name).exists(), name
    from safetensors.torch import load_file

    last, state = load_file("checkpoints/a/last.safetensors"), torch.load("checkpoints/a/state.pt", weights_only=False)
    assert last.keys() == state["model"].keys()
    assert all(torch.equal(last[k], state["model"][k]) for k in last)  # the weights training ended with
    env = json.loads(Path("checkpoints/a/env.json").read_text())
    assert env["versions"]["torch"].startswith("2.14.1") and env["end_time"]


def test_seed_everything_seeds_python_numpy_and_torch():
    def draws():
        return random.random(), np.random.rand(), torch.rand(1).item()

    seed_everything(11)
    first = draws()
    seed_everything(11)
    assert draws() == first
    seed_everything(12)
    assert all(a != b for a, b in zip(draws(), first))


def test_replay_detects_a_difference(workdir, monkeypatch):
    assert run_cli("base", TINY, "--out", "checkpoints/a") == 0
    from instill import train

    monkeypatch.setattr(train, "lr_factor", lambda *args: 0.5)  # the same config computing something else
    assert run_cli("base", "checkpoints/a/config.yaml") == 0
    replay = json.loads(Path("checkpoints/a-replay-1/replay.json").read_text())
    assert replay["matches"] is False and replay["max_abs_diff"] > 0


def test_a_new_run_beside_a_finished_one_is_numbered_not_a_replay(workdir, capsys):
    import yaml

    assert run_cli("base", TINY, "--out", "checkpoints/a") == 0
    assert run_cli("base", TINY, "--out", "checkpoints/a") == 0  # a new seed: a new run, as `make demo` twice
    assert run_cli("base", "checkpoints/a/config.yaml", "--set", "train.optimizer.lr=0.01") == 0  # another config
    out = capsys.readouterr().out
    assert "replay" not in out and "DIFFERS" not in out
    assert not list(Path("checkpoints").glob("a-replay-*"))
    for k in (2, 3):
        run = Path(f"checkpoints/a-{k}")
        assert (run / "summary.json").is_file() and not (run / "replay.json").exists()
        assert yaml.safe_load((run / "config.yaml").read_text())["output_dir"] == str(run)
    assert run_cli("base", "checkpoints/a-2/config.yaml") == 0  # its snapshot replays it, beside it
    assert json.loads(Path("checkpoints/a-2-replay-1/replay.json").read_text())["matches"] is True


def interrupt_at(monkeypatch, step: int):
    """Press Ctrl-C (send SIGINT to this process) in the middle of optimizer step ``step``."""
    from instill import train

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


SEEDED = ["--set", "reproducibility.reproduce=true", "--set", "reproducibility.random_seed=7"]


@pytest.mark.parametrize("settings, cut_at", [
    (["train.eval_unit=step", "train.eval_every=5"], 10),  # Ctrl-C during a step that evaluates
    (["train.max_steps=10"], 10),  # ... during the last step
    (["train.max_steps=10", "train.grad_accum=2"], 7),  # ... the partial group ending epoch 1 (13 batches)
])
def test_ctrl_c_at_a_step_that_evaluates_or_stops(workdir, monkeypatch, settings, cut_at):
    sets = SEEDED + [arg for s in settings for arg in ("--set", s)]
    assert run_cli("base", TINY, "--out", "checkpoints/whole", *sets) == 0
    with monkeypatch.context() as m:
        interrupt_at(m, cut_at)
        assert run_cli("base", TINY, "--out", "checkpoints/cut", *sets) == 130
    assert run_cli("base", TINY, "--out", "checkpoints/cut", "--resume") == 0
    whole = comparable(read_metrics("checkpoints/whole"))
    assert comparable(read_metrics("checkpoints/cut")) == whole
    summaries = [json.loads(Path(f"checkpoints/{d}/summary.json").read_text()) for d in ("whole", "cut")]
    assert summaries[1]["steps"] == summaries[0]["steps"] and summaries[1]["stop_reason"] == summaries[0]["stop_reason"]


def test_duration_adds_up_over_resumes(workdir, monkeypatch):
    with monkeypatch.context() as m:
        interrupt_at(m, 5)
        assert run_cli("base", TINY, "--out", "checkpoints/cut") == 130
    env = json.loads(Path("checkpoints/cut/env.json").read_text())
    assert env["elapsed_s"] > 0
    env["elapsed_s"] = 1000.0  # as if the interrupted process had run that long
    atomic_write_json("checkpoints/cut/env.json", env)
    assert run_cli("base", TINY, "--out", "checkpoints/cut", "--resume") == 0
    summary = json.loads(Path("checkpoints/cut/summary.json").read_text())
    assert 1000 < summary["duration_s"] < 1300
    assert json.loads(Path("checkpoints/cut/env.json").read_text())["elapsed_s"] == pytest.approx(
        summary["duration_s"], abs=0.01)


def test_ctrl_c_before_training_saves_nothing_and_says_so(workdir, monkeypatch, capsys):
    def interrupted_main(ctx):
        raise KeyboardInterrupt

    replace_stage_main(monkeypatch, "base", interrupted_main)
    assert run_cli("base", TINY, "--out", "checkpoints/x") == 130
    err = capsys.readouterr().err
    assert "nothing to resume" in err and "state saved" not in err
    assert not Path("checkpoints/x").exists()


def test_ctrl_c_in_an_upstream_run_is_continued_by_the_same_command(workdir, monkeypatch, capsys):
    with monkeypatch.context() as m:
        interrupt_at(m, 3)  # the first loop to run: the base stage, run as the ablate config's upstream
        assert run_cli("ablate", "configs/tiny_shapes_ablate.yaml") == 130
    assert "rerun the same command" in capsys.readouterr().err
    assert run_status(Path("checkpoints/tiny_shapes_base")) == "unfinished (resumable)"
    assert not Path("checkpoints/tiny_shapes_ablate").exists()
    assert run_cli("ablate", "configs/tiny_shapes_ablate.yaml") == 0
    assert "tiny_shapes_base is unfinished, so resuming" in capsys.readouterr().out
    assert run_status(Path("checkpoints/tiny_shapes_base")) == "finished"


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
    with pytest.raises(UserError, match="cannot write .*summary.json: disk full"):
        atomic_write_json(target, {"v": 2})
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]  # no temporary file left behind


def test_claim_run_dir_rules(tmp_path):
    out = tmp_path / "r"
    with pytest.raises(UserError, match="does not exist"):
        claim_run_dir(out, resume=True, populate=lambda d: None)
    path, replay_of, lock, resumed = claim_run_dir(out, resume=False, populate=lambda d: (d / "seed.txt").touch())
    assert (path, replay_of, resumed) == (out, None, False) and (out / "seed.txt").is_file()
    lock.release()
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not a run directory"):
        claim_run_dir(other, resume=False, populate=lambda d: None)
    assert [p.name for p in other.iterdir()] == ["notes.txt"]


def test_a_library_rejecting_passed_on_keywords_is_one_line_and_leaves_nothing(workdir, capsys):
    Path("timm.yaml").write_text("data: {name: digits, limit: 100}\n"
                                 "model: {name: 'timm:resnet18', kwargs: {no_such_option: 1}}\n"
                                 "train: {epochs: 1, threads: 1}\n")
    assert run_cli("base", "timm.yaml") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model timm:resnet18" in err and "no_such_option" in err, err
    assert not any(Path("checkpoints").iterdir())  # no run directory, no staging directory


def test_user_error_after_start_leaves_no_run_directory(workdir, monkeypatch, capsys):
    def failing_main(ctx):
        raise UserError("something the user got wrong")

    replace_stage_main(monkeypatch, "base", failing_main)
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
    Path("checkpoints/lists").mkdir()  # metrics rows that are JSON but not objects
    (Path("checkpoints/lists") / "seed.txt").write_text("6\n")
    (Path("checkpoints/lists") / "metrics.jsonl").write_text('[1, 2]\n{"step": 1, "val_acc": 0.25}\n"x"\n')
    Path("checkpoints/dir_metrics/metrics.jsonl").mkdir(parents=True)  # a directory where a file belongs
    (Path("checkpoints/dir_metrics") / "seed.txt").write_text("7\n")
    Path("checkpoints/binary").mkdir()
    (Path("checkpoints/binary") / "seed.txt").write_bytes(b"\xff\xfe\x00")
    capsys.readouterr()
    assert report_main(["checkpoints", "--plot"]) == 0
    out = capsys.readouterr().out
    assert "finished" in out and "broken" in out and "unfinished (resumable)" in out
    assert "test_acc" in out and Path("checkpoints/good/curves.png").exists()
    rows = {line.split()[0]: line for line in out.splitlines()[1:] if not line.startswith("wrote")}
    assert "0.2500" in rows["lists"]
    assert "broken (metrics.jsonl is not a file)" in rows["dir_metrics"]
    assert "broken (unreadable" in rows["binary"]
    assert report_main(["nowhere"]) == 2


def test_report_finds_nested_runs_and_lists_a_sweeps_sub_runs(workdir, capsys):
    sweep = Path("checkpoints/seeds/s1/transfer")  # a folder of pipelines, each a folder of runs
    (sweep / "subnet").mkdir(parents=True)
    (sweep / "random_init").mkdir()
    (sweep / "seed.txt").write_text("9\n")
    atomic_write_json(sweep / "summary.json", {"status": "finished", "stage": "transfer"})
    (sweep / "metrics.jsonl").write_text('{"step": 2, "test_acc": 0.99}\n')  # the sweep's own log: not its figures
    atomic_write_json(sweep / "subnet" / "summary.json", {"status": "finished", "test_acc": 0.75, "shape_bias": 0.5})
    torch.save({}, sweep / "random_init" / "state.pt")
    (sweep / "random_init" / "metrics.jsonl").write_text('{"step": 1, "val_acc": 0.125}\n')
    assert report_main(["checkpoints"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert set(rows) == {"seeds/s1/transfer", "seeds/s1/transfer/subnet", "seeds/s1/transfer/random_init"}
    assert "transfer" in rows["seeds/s1/transfer"] and "0.99" not in rows["seeds/s1/transfer"]
    assert "finished" in rows["seeds/s1/transfer/subnet"] and "0.7500" in rows["seeds/s1/transfer/subnet"]
    assert "unfinished (resumable)" in rows["seeds/s1/transfer/random_init"]
    assert "0.1250" in rows["seeds/s1/transfer/random_init"]


def test_read_metrics_keeps_objects_and_survives_unreadable_files(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n[1, 2]\n7\n{"step": 2}\n{"step": 3, "cut off\n{"step": 4}\n')
    assert read_metrics(tmp_path) == [{"step": 1}, {"step": 2}]
    assert read_metrics(tmp_path / "missing") == []
    (tmp_path / "dir" / "metrics.jsonl").mkdir(parents=True)
    assert read_metrics(tmp_path / "dir") == []
