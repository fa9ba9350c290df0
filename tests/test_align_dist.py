"""The learning rules under torchrun: two CPU processes (gloo) train every rule of a tiny align config.

Under torchrun each rank takes every second index of the epoch's permutation (``BatchLoader``), so the two ranks'
batches of step i together are exactly the single process's batch i of twice the size; the rules' gradients are
averaged over the ranks (as DDP does for backprop), and the loss is a mean over the batch. Hence, without batch
norm, both ranks end with identical weights, and those equal the weights of one process on the doubled batch (up
to float summation order). With the batch-statistics norm of the NTK models they would not equal the single
process's by design: each rank normalises with its own half batch (as DDP without SyncBatchNorm does), so this
check runs the models without it; the ranks' weights agree either way.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import python_env, run_cli

RULES = ["backprop", "align_zero", "align_ada", "align_prop", "fa", "dfa", "last_layer"]

# Saves each rank's final weights of every sub-run beside the run (rank 0 alone writes the run directory).
WEIGHT_SAVING_ENTRY = """
import torch
from instill import dist
from instill.cli import entry
from instill.align import stage as align

original_fit = align.fit


def fit(model, objective, train, cfg, run, **kwargs):
    result = original_fit(model, objective, train, cfg, run, **kwargs)
    torch.save(model.state_dict(), f"weights/{dist.rank()}-{run.path.name}.pt")
    return result


align.fit = fit
entry("align")
"""

CONFIG = """stage: align
reproducibility: {reproduce: true, random_seed: 11}
data: {name: digits, limit: 80}
model: {name: ntk_mlp, depth: 2, width: 8, batch_norm: false}
train: {epochs: 2, batch_size: 10, eval_batch_size: 100, optimizer: {name: SGD, lr: 0.5}, progress: false,
        threads: 1}
align: {rules: [%s], scores: true}
""" % ", ".join(RULES)


def test_every_rule_under_torchrun_matches_one_process_on_the_global_batch(workdir, monkeypatch):
    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.exists():
        pytest.skip("torchrun not installed beside this python")
    Path("entry.py").write_text(WEIGHT_SAVING_ENTRY)
    Path("dist.yaml").write_text(CONFIG)
    Path("weights").mkdir()
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", "entry.py", "dist.yaml",
                           "--out", "checkpoints/ddp"], env=python_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    single = {}
    from instill.align import stage as align

    original_fit = align.fit

    def fit(model, objective, train, cfg, run, **kwargs):
        result = original_fit(model, objective, train, cfg, run, **kwargs)
        single[run.path.name] = {k: v.clone() for k, v in model.state_dict().items()}
        return result

    monkeypatch.setattr(align, "fit", fit)
    assert run_cli("align", "dist.yaml", "--out", "checkpoints/one", "--set", "train.batch_size=20") == 0

    for rule in RULES:
        name = f"{rule}-lr0.5"
        ranks = [torch.load(f"weights/{r}-{name}.pt", weights_only=True) for r in (0, 1)]
        for key, value in single[name].items():
            assert torch.equal(ranks[0][key], ranks[1][key]), f"{rule} {key}: the ranks' weights differ"
            torch.testing.assert_close(ranks[0][key], value, rtol=1e-4, atol=1e-5, msg=f"{rule} {key}")
    # the alignment baseline (backprop's online Align-zero accumulator) agrees too: the same scores
    import csv

    def scores(path):
        with open(path) as f:
            row = next(r for r in csv.DictReader(f) if r["rule"] == "backprop")
        return {k: float(v) for k, v in row.items() if k.startswith("align")}

    one, two = scores("checkpoints/one/results.csv"), scores("checkpoints/ddp/results.csv")
    assert one and one.keys() == two.keys()
    for key in one:
        assert one[key] == pytest.approx(two[key], abs=1e-4), key


def test_a_torchrun_run_killed_mid_training_resumes_to_the_same_files(workdir):
    """kill -9 of one rank at a random optimizer step (a lost process or node): torchrun tears the job down, and
    ``torchrun ... --resume`` ends with the files of an uninterrupted torchrun run (timing figures aside)."""
    import os
    import random

    from instill.run import is_finished
    from tests.conftest import REPO
    from tests.test_crash_resume import assert_same_run

    torchrun = Path(sys.executable).parent / "torchrun"
    if not torchrun.exists():
        pytest.skip("torchrun not installed beside this python")
    Path("dist.yaml").write_text(CONFIG.replace(", ".join(RULES), "backprop, align_ada, dfa")
                                 .replace("epochs: 2", "epochs: 3"))

    def launch(out: str, *extra: str, kill_at: int | None = None) -> subprocess.CompletedProcess:
        env = python_env()
        if kill_at is not None:  # every rank counts its fault points (rank 0 also its file writes): one dies first
            env["INSTILL_KILL_AT"] = str(kill_at)
        return subprocess.run([str(torchrun), "--standalone", "--nproc_per_node=2", str(REPO / "align.py"), "dist.yaml",
                               "--out", out, *extra], env=env, capture_output=True, text=True, timeout=300)

    whole = launch("checkpoints/whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    steps_per_rank = 3 * 3 * 4  # rules x epochs x (80 images / 2 ranks / batches of 10)
    kill_at = random.Random(os.urandom(8)).randint(2, steps_per_rank - 2)
    what = f"killed at fault point {kill_at}"
    killed = launch("checkpoints/killed", kill_at=kill_at)
    assert killed.returncode != 0 and not is_finished("checkpoints/killed"), f"{what}: the run was not stopped"
    resume = ["--resume"] if Path("checkpoints/killed").exists() else []  # killed before its directory appeared
    resumed = launch("checkpoints/killed", *resume)
    assert resumed.returncode == 0, f"{what}: {resumed.stderr[-3000:]}"
    assert_same_run(Path("checkpoints/whole"), Path("checkpoints/killed"), what)
