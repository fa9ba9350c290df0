"""A sweep submitted to a real SLURM cluster as a job array (tools/slurm/start.sh starts one; .ci/run does)."""

from __future__ import annotations

import json
import os
import subprocess
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
