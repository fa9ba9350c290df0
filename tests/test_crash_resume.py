"""A kill -9 (and, in sweeps, a Ctrl-C) at random moments of every stage, then --resume: the run directory ends
file for file as an uninterrupted run's (timing figures aside), and replaying it matches.

The crash is real: the run goes on in a forked copy of this process (torch already imported, so each try costs
only the run itself) that kills itself with SIGKILL at the N-th ``instill.files.fault_point`` (after every optimizer
step and between the steps of every file write), chosen at random in each of several equal slices of the run.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import shutil
from pathlib import Path

import pytest
import yaml

from instill import files as files_module
from instill.run import LOCK_FILE, TIMING_PREFIX, is_finished
from tests.conftest import CONFIGS, run_cli

SEED = ["--set", "reproducibility.reproduce=true", "--set", "reproducibility.random_seed=11"]
STAGES = {  # stage: (config, crash moments, replay the resumed run too)
    "base": ("configs/tiny_shapes_base.yaml", 2, False),
    "ablate": ("configs/tiny_shapes_ablate.yaml", 2, False),
    "transfer": ("configs/tiny_shapes_transfer.yaml", 3, True),
    "guide": ("configs/tiny_guide_parity.yaml", 3, True),
}
NOT_COMPARED = {"env.json", "state.pt", LOCK_FILE}  # times, and training state that holds them


def run_killed_at(stage: str, args: list[str], kill_at: int, signal_name: str = "SIGKILL") -> bool:
    """Run the command in a forked child that sends itself ``signal_name`` at fault point ``kill_at``; True when it
    was killed (SIGKILL) or stopped by the interrupt (SIGINT: exit code 130)."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 99
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            os.environ["INSTILL_KILL_AT"] = str(kill_at)
            os.environ["INSTILL_KILL_SIGNAL"] = signal_name
            files_module._fault_count = 0
            code = run_cli(stage, *args)
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    code = None if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
    assert code in (None, 0, 130), f"the stopped run exited {code}"
    return code is None or code == 130


def comparable(path: Path):
    """The content of a run file with its timing figures left out."""
    if path.suffix == ".json":
        return _drop_timing(json.loads(path.read_text()))
    if path.suffix == ".jsonl":
        return [_drop_timing(json.loads(line)) for line in path.read_text().splitlines()]
    if path.name == "config.yaml":  # the same run but for its directory's name
        return {k: v for k, v in yaml.safe_load(path.read_text()).items() if k != "output_dir"}
    if path.suffix == ".csv":
        return [_drop_timing(row) for row in csv.DictReader(io.StringIO(path.read_text()))]
    return path.read_bytes()


def _drop_timing(value):
    if isinstance(value, dict):
        return {k: _drop_timing(v) for k, v in value.items() if not k.startswith(TIMING_PREFIX) and k != "duration_s"}
    if isinstance(value, list):
        return [_drop_timing(v) for v in value]
    return value


def files(root: Path) -> dict[str, Path]:
    return {str(p.relative_to(root)): p for p in sorted(root.rglob("*")) if p.is_file()}


def assert_same_run(reference: Path, other: Path, what: str) -> None:
    ours, theirs = files(reference), files(other)
    assert ours.keys() == theirs.keys(), f"{what}: files differ: {sorted(ours.keys() ^ theirs.keys())}"
    for name, path in ours.items():
        if path.name in NOT_COMPARED:
            continue
        assert comparable(path) == comparable(theirs[name]), f"{what}: {name} differs"


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A folder with the test configs and the finished base and ablate runs (upstream of ablate and transfer; the
    base run is also the uninterrupted reference of base): shared by the stages' tests."""
    folder = tmp_path_factory.mktemp("pipeline")
    shutil.copytree(CONFIGS, folder / "configs")
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        counts = {}
        for stage in ("base", "ablate"):
            before = files_module._fault_count
            assert run_cli(stage, STAGES[stage][0], *SEED) == 0
            counts[stage] = files_module._fault_count - before
    finally:
        os.chdir(cwd)
    return folder, counts


@pytest.mark.parametrize("stage", list(STAGES))
def test_kill_9_at_random_moments_then_resume_gives_identical_files(pipeline, monkeypatch, stage, capsys):
    folder, counts = pipeline
    monkeypatch.chdir(folder)
    config, moments, replay = STAGES[stage]
    name = Path(config).stem
    reference = Path("checkpoints") / name
    if stage == "base":  # the pipeline's own run is the uninterrupted one (ablate's records a relative path)
        points = counts[stage]
    else:
        reference = Path(f"checkpoints/{stage}-whole/{name}")
        before = files_module._fault_count
        assert run_cli(stage, config, *SEED, "--out", str(reference)) == 0
        points = files_module._fault_count - before
    rng = random.Random(os.urandom(8))
    picks = [rng.randint(i * points // moments + 1, (i + 1) * points // moments) for i in range(moments)]
    for i, kill_at in enumerate(picks):
        signal_name = "SIGINT" if replay and i == 1 else "SIGKILL"  # a sweep also gets a Ctrl-C at a random moment
        what = f"{stage} stopped by {signal_name} at fault point {kill_at} of {points}"
        out = Path(f"checkpoints/{stage}-killed-{kill_at}/{name}")  # the reference's name: plots show it
        args = [config, *SEED, "--out", str(out)]
        assert run_killed_at(stage, args, kill_at, signal_name), f"{what}: the run ended before the kill"
        if not is_finished(out):  # (killed after its very last write, it is)
            resume = ["--resume"] if out.exists() else []  # killed before its directory appeared: run it again
            assert run_cli(stage, *args, *resume) == 0, f"{what}: {capsys.readouterr().err}"
        assert_same_run(reference, out, what)
        assert not list(out.parent.glob(".instill-staging-*")), f"{what}: staging directory left behind"
    if replay:
        assert run_cli(stage, str(out / "config.yaml")) == 0
        report = json.loads(Path(f"{out}-replay-1/replay.json").read_text())
        assert report["matches"] is True, report
