"""A sweep submitted to a real SLURM cluster as a job array (tools/slurm/start.sh starts one; .ci/run does)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from instill.run import is_finished
from instill.sweep import main as sweep_main, slurm_problem

# In CI (.ci/run sets INSTILL_REQUIRE_SLURM=1) a missing cluster is a failure, not a skip.
NO_CLUSTER = slurm_problem()
if NO_CLUSTER and os.environ.get("INSTILL_REQUIRE_SLURM") != "1":
    pytest.skip(f"no SLURM cluster here: {NO_CLUSTER} (tools/slurm/start.sh starts one, as root)",
                allow_module_level=True)


def test_sweep_runs_as_a_slurm_job_array(workdir, capsys):
    assert NO_CLUSTER is None, f"INSTILL_REQUIRE_SLURM=1 but {NO_CLUSTER}"
    Path("s.yaml").write_text("""sweep:
  config: configs/tiny_digits.yaml
  stage: base
  grid: {reproducibility.random_seed: [1, 2]}
  set: {reproducibility.reproduce: true, train.epochs: 1}
  executor: {kind: auto, slurm: {time_min: 10, cpus_per_task: 1, array_parallelism: 2}}
""")
    assert sweep_main(["s.yaml"]) == 0, capsys.readouterr()
    out = capsys.readouterr().out
    assert "(slurm)" in out and "submitted job array" in out
    root = Path("checkpoints/s")
    jobs = json.loads((root / "slurm" / "jobs.json").read_text())
    assert len(jobs) == 2 and len({j.split("_")[0] for j in jobs.values()}) == 1  # one array, two tasks
    for name in jobs:
        assert is_finished(root / name)
        outcome = json.loads((root / "points" / f"{name}.json").read_text())
        assert outcome["state"] == "finished" and outcome["job_id"]  # it ran inside a SLURM job
    array = next(iter(jobs.values())).split("_")[0]
    for _ in range(60):  # a task's result is back a moment before SLURM records it COMPLETED
        accounting = subprocess.run(["sacct", "-X", "-n", "-P", "-j", array, "-o", "JobID,State"],
                                    capture_output=True, text=True, check=True).stdout
        if accounting.count("COMPLETED") == 2:
            break
        time.sleep(0.5)
    assert accounting.count("COMPLETED") == 2, accounting
    seeds = {json.loads((root / n / "summary.json").read_text())["seed"] for n in jobs}
    assert seeds == {1, 2}
    # rerunning the sweep submits nothing: every point is finished
    assert sweep_main(["s.yaml"]) == 0
    assert "2 finished, 0 to run" in capsys.readouterr().out


def _squeue(name: str) -> list[str]:
    """The queue's lines (job id, state) of the jobs named ``name``: a pending array is one line."""
    out = subprocess.run(["squeue", "-h", "-n", name, "-o", "%i %T"], capture_output=True, text=True, check=True)
    return out.stdout.split("\n")[:-1]


def _sacct_jobs(name: str) -> set[str]:
    """The job ids SLURM's accounting holds for the jobs named ``name`` (array tasks as ARRAY_TASK)."""
    out = subprocess.run(["sacct", "-X", "-n", "-P", "--name", name, "-S", "now-1hour", "-o", "JobID"],
                         capture_output=True, text=True, check=True)
    return set(out.stdout.split())


def _write_held_sweep(sweep_name: str) -> None:
    """s.yaml: one point of tiny_digits, submitted as a held SLURM job (it waits in the queue until released)."""
    Path("s.yaml").write_text(f"""sweep:
  config: configs/tiny_digits.yaml
  stage: base
  grid: {{reproducibility.random_seed: [7]}}
  set: {{reproducibility.reproduce: true, train.epochs: 1}}
  output_dir: checkpoints/{sweep_name}
  executor: {{kind: slurm, slurm: {{time_min: 10, cpus_per_task: 1, additional: {{hold: true}}}}}}
""")


def _wait_for(condition, seconds: float, what: str):
    deadline = time.time() + seconds
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}")


def test_rerun_adopts_a_queued_job_instead_of_submitting_again(workdir, capsys):
    """The first run submits the point held (sbatch --hold) and is stopped while the job is still PENDING; the
    rerun finds the job id in the point's state, waits for that job (no second submission: one job in squeue and
    in sacct) and reports its result once the job is released and has run."""
    assert NO_CLUSTER is None, f"INSTILL_REQUIRE_SLURM=1 but {NO_CLUSTER}"
    from .conftest import python_env

    sweep_name = f"held-{os.getpid()}"
    name = f"instill-{sweep_name}"  # its jobs' name
    _write_held_sweep(sweep_name)
    command = [sys.executable, "-m", "instill.sweep", "s.yaml"]
    state_file = Path(f"checkpoints/{sweep_name}/points/000-random_seed=7.json")
    first = subprocess.Popen(command, env=python_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    rerun = None
    try:
        recorded = _wait_for(lambda: state_file.is_file() and json.loads(state_file.read_text()), 60,
                             "the submission to be recorded")
        assert recorded["state"] == "submitted" and recorded["slurm_job"]
        job = recorded["slurm_job"]
        first.kill()  # the sweep process dies (Ctrl-C would cancel the job: see the next test); the job stays queued
        assert first.wait(30) == -signal.SIGKILL
        assert _squeue(name) == [f"{job} PENDING"]
        # a local rerun leaves the point to its queued job instead of running it here as well
        assert sweep_main(["s.yaml", "--executor", "local"]) == 1
        assert f"queued: 000-random_seed=7: SLURM job {job} is PENDING" in capsys.readouterr().out
        assert not Path(f"checkpoints/{sweep_name}/000-random_seed=7").exists()

        rerun = subprocess.Popen(command, env=python_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True)
        adopted = rerun.stdout.readline() + rerun.stdout.readline()
        assert f"adopted SLURM job {job} (PENDING), not submitted again" in adopted, adopted
        time.sleep(2)  # a resubmission would show by now
        assert _squeue(name) == [f"{job} PENDING"] and rerun.poll() is None
        subprocess.run(["scontrol", "release", job.split("_")[0]], check=True)
        out, _ = rerun.communicate(timeout=300)
        assert rerun.returncode == 0, adopted + out
        assert "1 of 1 points finished" in out and "submitted job array" not in adopted + out
    finally:
        for process in (first, rerun):
            if process is not None and process.poll() is None:
                process.kill()
        subprocess.run(["scancel", "-n", name], check=False)
    root = Path(f"checkpoints/{sweep_name}")
    assert is_finished(root / "000-random_seed=7")
    outcome = json.loads(state_file.read_text())
    assert outcome["state"] == "finished" and outcome["slurm_job"] == job  # it ran as the adopted job
    assert _wait_for(lambda: _sacct_jobs(name), 30, "accounting") == {job}  # one job ever submitted


def test_ctrl_c_cancels_the_jobs_the_sweep_still_waits_for(workdir):
    """Ctrl-C is the user stopping the sweep: its queued jobs are cancelled, none is left behind in the queue."""
    assert NO_CLUSTER is None, f"INSTILL_REQUIRE_SLURM=1 but {NO_CLUSTER}"
    from .conftest import python_env

    sweep_name = f"stopped-{os.getpid()}"
    name = f"instill-{sweep_name}"
    _write_held_sweep(sweep_name)
    state_file = Path(f"checkpoints/{sweep_name}/points/000-random_seed=7.json")
    sweep = subprocess.Popen([sys.executable, "-m", "instill.sweep", "s.yaml"], env=python_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(lambda: state_file.is_file() and json.loads(state_file.read_text()).get("slurm_job"), 60,
                  "the submission to be recorded")
        sweep.send_signal(signal.SIGINT)
        assert sweep.wait(30) == 130
        _wait_for(lambda: _squeue(name) == [], 30, "the cancelled job to leave the queue")
    finally:
        if sweep.poll() is None:
            sweep.kill()
        subprocess.run(["scancel", "-n", name], check=False)
