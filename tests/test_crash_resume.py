"""A kill -9 and a Ctrl-C at random moments of every stage kind (and of a sweep), then --resume (a rerun for the
sweep): the directory ends file for file as an uninterrupted run's (timing figures aside), and replaying it matches.

The crash is real: the run goes on in a forked copy of this process (torch already imported, so each try costs
only the run itself) that sends itself SIGKILL or SIGINT at the N-th ``instill.files.fault_point`` (after every
optimizer step and between the steps of every file write), chosen at random in each of several equal slices of the
run. A sweep's points run in worker processes: its whole process group gets the signal, after a random delay.

A new stage kind is covered by adding it to STAGES.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
import shutil
import signal
import time
from pathlib import Path

import pytest
import yaml

from instill import files as files_module
from instill.run import LOCK_FILE, TIMING_PREFIX, is_finished
from instill.sweep import main as sweep_main
from tests.conftest import CONFIGS, run_cli

SEED = ["--set", "reproducibility.reproduce=true", "--set", "reproducibility.random_seed=11"]
STAGES = {  # stage: (config, crash moments, replay the resumed run too, --set items that keep it small)
    "base": ("configs/tiny_shapes_base.yaml", 2, False, []),
    "ablate": ("configs/tiny_shapes_ablate.yaml", 2, False, []),
    "transfer": ("configs/tiny_shapes_transfer.yaml", 3, True, []),
    "guide": ("configs/tiny_guide_parity.yaml", 3, True, []),
    "align": ("configs/tiny_align.yaml", 3, True, ["align.rules=[backprop,fa,dfa]", "align.widths=[8]",
                                                 "train.epochs=1"]),
    "stitch": ("configs/tiny_stitch.yaml", 2, True, ["stitch.front_layers=[layers.0]"]),
    "compare": ("configs/tiny_compare.yaml", 2, False, []),
}
NOT_COMPARED = {"env.json", "state.pt", LOCK_FILE}  # times, and training state that holds them
SWEEP_NOT_COMPARED = {"logs", "points", "status.json", ".instill-sweep"}  # its bookkeeping: hosts, times, attempts


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


def assert_same_run(reference: Path, other: Path, what: str, skip: frozenset = frozenset()) -> None:
    def kept(root):
        return {k: v for k, v in files(root).items() if Path(k).parts[0] not in skip}

    ours, theirs = kept(reference), kept(other)
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
        for upstream in ("configs/tiny_stitch_a.yaml", "configs/tiny_stitch_b.yaml"):  # stitch's and compare's:
            assert run_cli("base", upstream) == 0  # trained first, so that every try's fault points are the same
    finally:
        os.chdir(cwd)
    return folder, counts


@pytest.mark.parametrize("stage", list(STAGES))
def test_kill_9_at_random_moments_then_resume_gives_identical_files(pipeline, monkeypatch, stage, capsys):
    folder, counts = pipeline
    monkeypatch.chdir(folder)
    config, moments, replay, small = STAGES[stage]
    seed = [*SEED, *(x for item in small for x in ("--set", item))]
    name = Path(config).stem
    reference = Path("checkpoints") / name
    if stage == "base" and not small:  # the pipeline's own run is the uninterrupted one (ablate records its path)
        points = counts[stage]
    else:
        reference = Path(f"checkpoints/{stage}-whole/{name}")
        before = files_module._fault_count
        assert run_cli(stage, config, *seed, "--out", str(reference)) == 0
        points = files_module._fault_count - before
    rng = random.Random(os.urandom(8))
    picks = [rng.randint(i * points // moments + 1, (i + 1) * points // moments) for i in range(moments)]
    for i, kill_at in enumerate(picks):
        signal_name = "SIGINT" if i == 1 else "SIGKILL"
        what = f"{stage} stopped by {signal_name} at fault point {kill_at} of {points}"
        out = Path(f"checkpoints/{stage}-killed-{kill_at}/{name}")  # the reference's name: plots show it
        args = [config, *seed, "--out", str(out)]
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


SWEEP = """sweep:
  config: configs/tiny_digits.yaml
  stage: base
  grid: {reproducibility.random_seed: [1, 2, 3]}
  set: {reproducibility.reproduce: true, train.epochs: 2}
  executor: {kind: local, workers: 2}
"""


def sweep_stopped_after(delay: float, out: str, signal_name: str) -> None:
    """Run the sweep in a forked child leading its own process group (its workers join it) and send the group
    ``signal_name`` after ``delay`` seconds, as a terminal's Ctrl-C or a kill of the job would."""
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            os.setpgid(0, 0)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            code = sweep_main(["sweep.yaml", "--out", out])
        finally:
            os._exit(code)
    time.sleep(delay)
    try:
        os.killpg(pid, getattr(signal, signal_name))
    except ProcessLookupError:  # it had finished
        pass
    _, status = os.waitpid(pid, 0)
    code = None if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
    assert code in (None, 0, 130), f"the stopped sweep exited {code}"
    if signal_name == "SIGKILL":  # nothing of the group may outlive it (a worker would still write)
        deadline = time.time() + 10
        while time.time() < deadline:
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)


def test_sweep_stopped_at_random_moments_then_rerun_gives_identical_files(pipeline, monkeypatch, capsys):
    folder, _ = pipeline
    monkeypatch.chdir(folder)
    Path("sweep.yaml").write_text(SWEEP)
    started = time.perf_counter()
    assert sweep_main(["sweep.yaml", "--out", "checkpoints/sweep-whole"]) == 0
    took = time.perf_counter() - started
    rng = random.Random(os.urandom(8))
    for i, signal_name in enumerate(["SIGKILL", "SIGINT", "SIGKILL"]):
        delay = rng.uniform(i * took / 3, (i + 1) * took / 3)
        out = f"checkpoints/sweep-stopped-{i}"
        sweep_stopped_after(delay, out, signal_name)
        assert sweep_main(["sweep.yaml", "--out", out]) == 0, capsys.readouterr()
        what = f"sweep stopped by {signal_name} after {delay:.2f} of {took:.2f} s"
        assert_same_run(Path("checkpoints/sweep-whole"), Path(out), what, frozenset(SWEEP_NOT_COMPARED))
        status = json.loads(Path(out, "status.json").read_text())
        assert status["counts"] == {"finished": 3}, what
