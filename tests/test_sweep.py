"""Sweeps: expansion, validation before anything is written, the local executor, resume, aggregation."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from instill.run import is_finished, read_metrics
from instill.sweep import main as sweep_main

from .conftest import python_env, replace_stage_main, run_cli

TINY = "configs/tiny_digits.yaml"


def write_sweep(path: str, body: str) -> str:
    Path(path).write_text("sweep:\n" + "".join(f"  {line}\n" for line in body.strip().splitlines()))
    return path


def seeds_sweep(path="s.yaml", seeds=(1, 2), extra="") -> str:
    return write_sweep(path, f"""
config: {TINY}
stage: base
grid: {{reproducibility.random_seed: {list(seeds)}}}
set: {{reproducibility.reproduce: true, train.epochs: 1}}
executor: {{kind: local, workers: 2}}
{extra}""")


def comparable(rows):
    return [{k: v for k, v in r.items() if not k.startswith("time_")} for r in rows]


def test_grid_crossed_with_points_names_and_values(workdir):
    from instill.sweep import expand_points, load_sweep

    write_sweep("s.yaml", f"""
config: {TINY}
stage: base
grid: {{reproducibility.random_seed: [1, 2], train.optimizer.lr: [0.01, 0.1]}}
points: [{{model.width: 8}}, {{model.width: 16, name: wide}}]
set: {{train.epochs: 1}}""")
    points = expand_points(load_sweep("s.yaml"), "s.yaml")
    assert len(points) == 8
    assert points[0]["name"] == "000-random_seed=1-lr=0.01-width=8"
    assert points[4]["name"] == "wide-random_seed=1-lr=0.01"
    assert points[7]["values"] == {"train.epochs": 1, "reproducibility.random_seed": 2, "train.optimizer.lr": 0.1,
                                   "model.width": 16}
    assert len({p["name"] for p in points}) == 8


def test_local_sweep_runs_every_point_as_a_normal_run_and_reports_them(workdir, capsys):
    seeds_sweep(extra="points: [{train.optimizer.lr: 0.003}, {train.optimizer.lr: 0.01}]")
    assert sweep_main(["s.yaml"]) == 0
    root = Path("checkpoints/s")
    record = json.loads((root / "sweep.json").read_text())
    assert record["grid"] == {"reproducibility.random_seed": [1, 2]} and len(record["points"]) == 4
    status = json.loads((root / "status.json").read_text())
    assert status["counts"] == {"finished": 4}
    summaries = {}
    for point in record["points"]:
        run = root / point["name"]
        assert is_finished(run) and (root / "logs" / f"{point['name']}.log").stat().st_size > 0
        summaries[point["name"]] = json.loads((run / "summary.json").read_text())
        assert summaries[point["name"]]["seed"] == point["values"]["reproducibility.random_seed"]
    # a point is a normal run: its config.yaml replays it exactly
    first = record["points"][0]["name"]
    assert run_cli("base", str(root / first / "config.yaml"), "--out", "checkpoints/again") == 0
    assert comparable(read_metrics("checkpoints/again")) == comparable(read_metrics(root / first))
    capsys.readouterr()

    from instill.report import main as report_main

    assert report_main([str(root), "--metric", "test_acc", "--x", "train.optimizer.lr"]) == 0
    out = capsys.readouterr().out
    assert "by train.optimizer.lr" in out and (root / "report" / "test_acc_vs_train.optimizer.lr.png").is_file()
    groups = (root / "report" / "groups.csv").read_text().splitlines()
    assert len(groups) == 3  # header + one row per learning rate, the seeds pooled
    for lr, line in zip((0.003, 0.01), groups[1:]):
        values = [s["test_acc"] for name, s in summaries.items() if f"lr={lr}" in name]
        cells = dict(zip(groups[0].split(","), line.split(",")))
        assert float(cells["test_acc mean"]) == pytest.approx(statistics.fmean(values))
        assert float(cells["test_acc std"]) == pytest.approx(statistics.stdev(values))
        assert cells["test_acc n"] == "2"

    assert sweep_main(["s.yaml"]) == 0  # nothing left to do
    assert "4 finished, 0 to run" in capsys.readouterr().out


def test_failed_point_does_not_stop_the_others_and_rerun_resumes(workdir, monkeypatch, capsys):
    """Seed 2 fails, seed 3 is interrupted mid-epoch; the rerun skips seed 1, reruns 2 and resumes 3 exactly."""
    from instill import train
    from instill.stages import get_stage

    original_main, original_step = get_stage("base").main, train._Loop._optimizer_step

    def failing_main(ctx):
        if ctx.seed == 2:
            raise RuntimeError("boom on seed 2")
        return original_main(ctx)

    def interrupted_step(self):
        if self.step + 1 == 17 and "random_seed=3" in str(self.run_dir.path):
            os.kill(os.getpid(), 2)  # Ctrl-C in that worker only
        original_step(self)

    seeds_sweep(seeds=(1, 2, 3), extra="set: {reproducibility.reproduce: true, train.epochs: 2}")
    with monkeypatch.context() as m:
        replace_stage_main(m, "base", failing_main)
        m.setattr(train._Loop, "_optimizer_step", interrupted_step)
        assert sweep_main(["s.yaml"]) == 1
    out = capsys.readouterr().out
    root = Path("checkpoints/s")
    status = json.loads((root / "status.json").read_text())["points"]
    states = {name.split("-")[1]: s["state"] for name, s in status.items()}
    assert states == {"random_seed=1": "finished", "random_seed=2": "failed", "random_seed=3": "interrupted"}
    assert "failed: 001-random_seed=2: RuntimeError: boom on seed 2" in out
    finished_summary = next(root.glob("000-*")) / "summary.json"
    stamp = finished_summary.stat().st_mtime_ns

    assert sweep_main(["s.yaml"]) == 0
    assert "1 finished, 2 to run" in capsys.readouterr().out
    assert finished_summary.stat().st_mtime_ns == stamp  # skipped, not rerun
    resumed = next(root.glob("002-*"))
    assert run_cli("base", TINY, "--out", "checkpoints/whole", "--set", "reproducibility.reproduce=true",
                   "--set", "reproducibility.random_seed=3", "--set", "train.epochs=2") == 0
    assert comparable(read_metrics(resumed)) == comparable(read_metrics("checkpoints/whole"))


def test_shared_upstream_is_produced_once_by_parallel_points(workdir):
    write_sweep("t.yaml", """
config: configs/tiny_shapes_transfer.yaml
stage: transfer
grid: {reproducibility.random_seed: [1, 2]}
set: {reproducibility.reproduce: true, transfer.conditions: [subnet, random_init], train.epochs: 1}
executor: {kind: local, workers: 2}""")
    assert sweep_main(["t.yaml"]) == 0
    assert is_finished("checkpoints/tiny_shapes_ablate") and is_finished("checkpoints/tiny_shapes_base")
    assert not list(Path("checkpoints").glob("*-replay-*"))  # made once, not once per point


def test_per_point_upstream_trains_each_points_own_base_and_mask(workdir, capsys):
    write_sweep("t.yaml", """
config: configs/tiny_shapes_transfer.yaml
stage: transfer
grid: {reproducibility.random_seed: [5, 6]}
set: {reproducibility.reproduce: true, transfer.conditions: [subnet, random_init], train.epochs: 1}
upstream: per_point
executor: {kind: local, workers: 2}""")
    assert sweep_main(["t.yaml"]) == 0
    assert not Path("checkpoints/tiny_shapes_base").exists()
    seeds = set()
    for name in ("000-random_seed=5", "001-random_seed=6"):
        upstream = Path("checkpoints/t/upstream") / name
        assert is_finished(upstream / "tiny_shapes_base") and is_finished(upstream / "tiny_shapes_ablate")
        seeds.add((upstream / "tiny_shapes_base" / "seed.txt").read_text())
        config = (Path("checkpoints/t") / name / "config.yaml").read_text()
        assert f"mask: checkpoints/t/upstream/{name}/tiny_shapes_ablate" in config  # the replay reuses it
    assert len(seeds) == 2
    capsys.readouterr()

    from instill.report import main as report_main

    assert report_main(["checkpoints/t", "--metric", "shape_bias"]) == 0
    out = capsys.readouterr().out
    assert "by condition" in out and "random_init" in out


KILLED_HOLDING_THE_PROGRESS_LOCK = """
import dataclasses, json, os
from tqdm.auto import tqdm
from instill.stages import STAGES, get_stage
from instill.sweep import main as sweep_main

tqdm.get_lock()  # this process made tqdm's lock before forking, as after any in-process run with a progress bar
original = get_stage("base")
original_main = original.main


def dying_main(ctx):
    if ctx.seed == 2:
        tqdm.get_lock().acquire()  # killed while a progress bar holds the lock
        os._exit(3)
    return original_main(ctx)


STAGES.register("base")(dataclasses.replace(original, main=dying_main))
assert sweep_main(["s.yaml"]) == 1
STAGES.register("base")(original)
assert sweep_main(["s.yaml"]) == 0
tqdm(total=1, disable=True).close()  # and this process can still draw a progress bar
print("finished", json.load(open("checkpoints/s/status.json"))["counts"])
"""


def test_a_worker_killed_holding_the_progress_bar_lock_blocks_nobody(workdir):
    seeds_sweep(seeds=(1, 2, 3))
    Path("killed.py").write_text(KILLED_HOLDING_THE_PROGRESS_LOCK)
    proc = subprocess.run([sys.executable, "killed.py"], env=python_env(), capture_output=True, text=True,
                          timeout=600)  # a deadlock fails here, not by hanging the suite
    assert proc.returncode == 0 and "finished {'finished': 3}" in proc.stdout, proc.stderr[-2000:]


BAD = [
    ("grid: {train.epoch: [1, 2]}", "unknown key 'train.epoch' (did you mean 'epochs'?)"),
    ("grid: {}", "the grid is empty and there are no points"),
    ("grid: {train.epochs: []}", "grid key 'train.epochs' has no values"),
    ("grid: {train.epochs: [1, two]}", "train.epochs: Input should be a valid integer"),
    ("grid: {train.epochs: [1]}\nexecutor: {kind: slurm}", "executor slurm: sbatch is not on the PATH"),
    ("grid: {train.epochs: [1]}\nexecutr: {kind: local}", "unknown key 'sweep.executr' (did you mean 'executor'?)"),
    ("grid: {train.epochs: [1]}\npoints: [{name: a}, {name: a}]", "point name 'a-epochs=1' is used twice"),
    ("grid: {train.epochs: [1]}\npoints: [{name: ../x}]", "is not a plain file name"),
]


@pytest.mark.parametrize("body, message", BAD)
def test_bad_sweeps_write_nothing_and_exit_2(workdir, monkeypatch, capsys, body, message):
    monkeypatch.setenv("PATH", "/nonexistent")  # no sbatch here, whatever the machine has
    write_sweep("bad.yaml", f"config: {TINY}\nstage: base\n{body}")
    assert sweep_main(["bad.yaml"]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not Path("checkpoints").exists()


def test_sbatch_without_a_controller_runs_local_under_auto_and_refuses_slurm(workdir, monkeypatch, capsys, tmp_path):
    """A laptop with SLURM's client installed and no controller: auto must not submit jobs that can never run."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool, body in (("sbatch", "echo 'sbatch: error: Unable to contact slurm controller' >&2; exit 1"),
                       ("scontrol", "echo 'Slurmctld(primary) at vm is DOWN'; exit 1")):
        (bin_dir / tool).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    from instill.sweep import choose_executor

    assert choose_executor("auto", "s.yaml") == "local"
    write_sweep("bad.yaml", f"config: {TINY}\nstage: base\ngrid: {{train.epochs: [1]}}\nexecutor: {{kind: slurm}}")
    assert sweep_main(["bad.yaml"]) == 2
    err = capsys.readouterr().err
    assert "the SLURM controller does not answer (scontrol ping)" in err and err.count("\n") == 1, err
    assert not Path("checkpoints").exists()


def test_a_sweep_directory_of_another_grid_is_refused(workdir, capsys):
    seeds_sweep(seeds=(1,))
    assert sweep_main(["s.yaml"]) == 0
    before = sorted(str(p) for p in Path("checkpoints").rglob("*"))
    for body in ("grid: {reproducibility.random_seed: [1, 2]}",
                 "grid: {reproducibility.random_seed: [1], train.epochs: [1]}"):
        Path("s.yaml").write_text(Path("s.yaml").read_text().replace(
            "grid: {reproducibility.random_seed: [1]}", body))
        capsys.readouterr()
        assert sweep_main(["s.yaml"]) == 2
        assert "holds a sweep with a different grid, set or upstream" in capsys.readouterr().err
        assert sorted(str(p) for p in Path("checkpoints").rglob("*")) == before
        seeds_sweep(seeds=(1,))


def test_a_sweep_killed_while_writing_its_record_runs_again(workdir, capsys):
    seeds_sweep(seeds=(1,))
    killed = Path("checkpoints/s")
    killed.mkdir(parents=True)
    (killed / ".instill-sweep").write_text("")  # its lock file, free: the process died
    (killed / ".sweep.json.k1l2.tmp").write_text('{"sour')  # its sweep.json, half written
    assert sweep_main(["s.yaml"]) == 0
    assert json.loads((killed / "sweep.json").read_text())["points"]
    assert not list(killed.glob(".sweep.json.*.tmp"))
    Path("checkpoints/t").mkdir()
    (Path("checkpoints/t") / "notes.txt").write_text("mine")  # a folder of someone else's stays refused
    assert sweep_main(["s.yaml", "--out", "checkpoints/t"]) == 2
    assert "is not a sweep directory" in capsys.readouterr().err


def test_explicit_points_may_be_added_to_a_sweep(workdir, capsys):
    seeds_sweep(seeds=(1,), extra="points: [{name: a, train.optimizer.lr: 0.01}]")
    assert sweep_main(["s.yaml"]) == 0
    seeds_sweep(seeds=(1,), extra="points: [{name: b, train.optimizer.lr: 0.003}]")
    assert sweep_main(["s.yaml"]) == 0
    record = json.loads(Path("checkpoints/s/sweep.json").read_text())
    assert [p["name"] for p in record["points"]] == ["a-random_seed=1", "b-random_seed=1"]
    seeds_sweep(seeds=(1,), extra="points: [{name: b, train.optimizer.lr: 0.1}]")  # same name, other values
    capsys.readouterr()
    assert sweep_main(["s.yaml"]) == 2
    assert "point b-random_seed=1 was recorded with other values" in capsys.readouterr().err


def test_command_line_validate_and_list(workdir, capsys):
    seeds_sweep()
    proc = subprocess.run([sys.executable, "-m", "instill.sweep", "s.yaml", "--validate"], capture_output=True,
                          text=True, env=python_env())
    assert proc.returncode == 0 and "valid sweep of 2 points (local executor)" in proc.stdout, proc.stderr
    assert sweep_main(["s.yaml", "--list"]) == 0
    assert "000-random_seed=1  pending" in capsys.readouterr().out
    assert not Path("checkpoints").exists()


def test_a_point_runs_under_torchrun_with_a_process_per_device(workdir):
    """What a SLURM job does for a multi-GPU point (here two CPU processes): torchrun inside, rank 0 writes."""
    from instill.sweep import prepare, run_point, write_record

    seeds_sweep(seeds=(4,))
    sweep = prepare("s.yaml")
    write_record(sweep)
    outcome = run_point(sweep.path, "000-random_seed=4", processes=2)
    assert outcome["state"] == "finished", Path("checkpoints/s/logs/000-random_seed=4.log").read_text()[-2000:]
    run = Path("checkpoints/s/000-random_seed=4")
    assert json.loads((run / "env.json").read_text())["world_size"] == 2
    assert json.loads((run / "summary.json").read_text())["seed"] == 4


def test_a_worker_that_dies_is_listed_and_the_rerun_finishes_the_sweep(workdir, monkeypatch, capsys):
    from instill.stages import get_stage

    original_main = get_stage("base").main

    def dying_main(ctx):
        if ctx.seed == 2:
            os._exit(3)  # killed: no exception, no outcome file
        return original_main(ctx)

    seeds_sweep(seeds=(1, 2, 3))
    with monkeypatch.context() as m:
        replace_stage_main(m, "base", dying_main)
        assert sweep_main(["s.yaml"]) == 1
    status = json.loads(Path("checkpoints/s/status.json").read_text())["points"]
    assert "worker process died" in status["001-random_seed=2"]["error"]
    assert sweep_main(["s.yaml"]) == 0
    assert json.loads(Path("checkpoints/s/status.json").read_text())["counts"] == {"finished": 3}


def test_a_grid_on_the_command_line_is_the_sweep_file_it_spells(workdir, capsys):
    """``python -m instill.sweep CONFIG --grid ...`` (Hydra's -m): the same points, files, resume and report."""
    argv = [TINY, "--stage", "base", "--grid", "reproducibility.random_seed=1,2", "--set",
            "reproducibility.reproduce=true", "--set", "train.epochs=1", "--executor", "local", "--workers", "2"]
    assert sweep_main(argv) == 0
    root = Path("checkpoints/tiny_digits-sweep")
    record = json.loads((root / "sweep.json").read_text())
    seeds_sweep()
    from instill.sweep import expand_points, load_sweep

    assert record["grid"] == {"reproducibility.random_seed": [1, 2]}
    assert record["points"] == expand_points(load_sweep("s.yaml"), TINY)  # what the sweep file gives
    assert all(is_finished(root / p["name"]) for p in record["points"])
    capsys.readouterr()
    assert sweep_main(argv) == 0  # the same command again: nothing left to do
    assert "2 finished, 0 to run" in capsys.readouterr().out
    # the stage from the config's own section; a list value per comma-separated item
    assert sweep_main(["configs/tiny_shapes_transfer.yaml", "--grid", "transfer.conditions=[subnet],[random_init]",
                       "--executor", "local", "--validate"]) == 0
    assert "valid sweep of 2 points" in capsys.readouterr().out
    assert sweep_main([TINY, "--validate"]) == 2
    assert "has no sweep: section; to sweep a stage config give its grid: --grid KEY=V1,V2" in capsys.readouterr().err
