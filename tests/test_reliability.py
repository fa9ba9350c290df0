"""Issue 21's defects, one test each: nothing lost, nothing silently wrong (sweeps, replays, workers, files)."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from instill import files
from instill.errors import UserError
from instill.report import aggregate
from instill.reproduce import Claim, claim_result, main as reproduce_main
from instill.run import Run
from instill.sweep import main as sweep_main
from tests.conftest import python_env, run_cli
from tests.test_reproduce import TINY_MANIFEST
from tests.test_run_safety import tmpfs

TINY = "configs/tiny_digits.yaml"


def test_safetensors_files_of_identical_saves_are_byte_identical(tmp_path):
    """safetensors writes its metadata in a hash map's order; an exact replay's files must compare equal."""
    model = torch.nn.Linear(3, 2)
    metadata = {f"key_{i}": str(i) for i in range(12)}
    run = Run(tmp_path)
    contents = set()
    for _ in range(6):
        run.save_weights("w", model, metadata=metadata)
        contents.add((tmp_path / "w.safetensors").read_bytes())
    assert len(contents) == 1


# ------------------------------------------------------------------------------------------------- sweeps


def write_sweep(body: str, path: str = "s.yaml") -> str:
    Path(path).write_text("sweep:\n" + "".join(f"  {line}\n" for line in body.strip().splitlines()))
    return path


@pytest.mark.parametrize("body, duplicates", [
    ("grid: {reproducibility.random_seed: [1, 1, 2]}", "000-random_seed=1 and 001-random_seed=1"),
    ("points: [{name: a, train.epochs: 1}, {name: b, train.epochs: 1}]", "a and b"),
])
def test_identical_sweep_points_are_refused_before_anything_runs(workdir, capsys, body, duplicates):
    write_sweep(f"config: {TINY}\nstage: base\nset: {{reproducibility.reproduce: true}}\n{body}")
    assert sweep_main(["s.yaml"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"points {duplicates} are identical" in err, err
    assert not Path("checkpoints").exists()


def test_a_sweep_report_counts_each_seed_once():
    rows = [{"state": "finished", "seed": 1, "condition": "a", "acc": 0.5},
            {"state": "finished", "seed": 1, "condition": "a", "acc": 0.5},
            {"state": "finished", "seed": 2, "condition": "a", "acc": 0.7}]
    table = aggregate(rows, ["condition"], ["acc"])
    assert table[0]["acc n"] == 2 and table[0]["acc mean"] == pytest.approx(0.6)


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry.name))
            except (OSError, IndexError, ValueError):
                pass
    return out


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_second_sweep_into_one_out_is_refused_and_workers_die_with_their_parent(workdir, capsys):
    """Two defects on one running sweep (its start-up is the cost): a second launch into its --out is refused in one
    line without touching it, and kill -9 of its main process ends its workers too."""
    write_sweep(f"config: {TINY}\nstage: base\ngrid: {{reproducibility.random_seed: [1, 2, 3]}}\n"
                "set: {train.epochs: 400, train.progress: false}\nexecutor: {kind: local, workers: 2}")
    first = subprocess.Popen([sys.executable, "-m", "instill.sweep", "s.yaml"], env=python_env(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: list[int] = []
    try:
        deadline = time.time() + 120
        while len(workers) < 2 and time.time() < deadline and first.poll() is None:
            time.sleep(0.1)
            workers = [p for p in _children(first.pid) if Path("checkpoints/s/logs").is_dir()]
        assert len(workers) == 2, "the sweep's workers did not start"
        assert sweep_main(["s.yaml"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        assert f"checkpoints/s is owned by the sweep of process {first.pid} " in err, err
        status = json.loads(Path("checkpoints/s/status.json").read_text())
        assert "failed" not in status["counts"], status
        first.send_signal(signal.SIGKILL)
        first.wait()
        deadline = time.time() + 10
        while any(_alive(w) for w in workers) and time.time() < deadline:
            time.sleep(0.1)
        assert not any(_alive(w) for w in workers), "a worker outlived the sweep's process"
    finally:
        for pid in [first.pid, *workers]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        first.wait()


def test_a_sweep_into_a_read_only_or_full_place_or_below_a_file_is_one_line(workdir, capsys, monkeypatch):
    write_sweep(f"config: {TINY}\nstage: base\ngrid: {{train.epochs: [1]}}")
    Path("afile").write_text("x")
    assert sweep_main(["s.yaml", "--out", "afile/sweep"]) == 2
    assert capsys.readouterr().err.strip() == "error: cannot write afile/sweep: afile is a file, not a folder"
    with tmpfs(Path("ro"), "ro,size=64k"):
        assert sweep_main(["s.yaml", "--out", "ro/sweep"]) == 2
        assert capsys.readouterr().err.strip() == "error: cannot write ro/sweep: Read-only file system"
    with tmpfs(Path("full"), "size=4k"):
        Path("full/filler").write_bytes(b"x" * 4096)
        assert sweep_main(["s.yaml", "--out", "full/sweep"]) == 2
        err = capsys.readouterr().err.strip()
        assert err == "error: cannot write full/sweep/.instill-sweep: No space left on device", err
        assert sorted(os.listdir("full")) == ["filler"]
    for number in (errno.EACCES, errno.EDQUOT):  # root passes permissions; quotas need a quota-enabled disk
        def refuse(*args, number=number, **kwargs):
            raise OSError(number, os.strerror(number))

        with monkeypatch.context() as patch:
            patch.setattr(os, "replace", refuse)
            assert sweep_main(["s.yaml", "--out", f"out{number}"]) == 2
        err = capsys.readouterr().err.strip()
        assert err == f"error: cannot write out{number}/sweep.json: {os.strerror(number)}", err
        assert not Path(f"out{number}").exists()


# ------------------------------------------------------------------------------------------- non-finite models


@pytest.fixture(scope="module")
def two_models(tiny_convnet_runs):
    """The two tiny ConvNets of the stitch tests, trained once: their run directories."""
    return tiny_convnet_runs


def poison(run_dir: Path, tensor: str, value: float) -> None:
    from safetensors.torch import load_file, save_file

    weights = load_file(run_dir / "model.safetensors")
    weights[tensor][0] = value
    save_file(weights, run_dir / "model.safetensors")


@pytest.mark.parametrize("stage, value", [("stitch", float("nan")), ("compare", float("inf"))])
def test_a_model_with_non_finite_weights_is_named_in_one_line_and_nothing_is_written(workdir, two_models, capsys,
                                                                                     stage, value):
    shutil.copytree(two_models, "checkpoints")
    poison(Path("checkpoints/tiny_stitch_a"), "layers.0.0.weight", value)
    before = sorted(str(p) for p in Path("checkpoints").rglob("*"))
    assert run_cli(stage, f"configs/tiny_{stage}.yaml") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "checkpoints/tiny_stitch_a/model.safetensors: weight 'layers.0.0.weight' holds NaN or inf" in err, err
    assert sorted(str(p) for p in Path("checkpoints").rglob("*")) == before


# ------------------------------------------------------------------------------------------------------ Ctrl-C


def run_in_child(args: list[str], stage: str = "base", kill_at: int = 0) -> tuple[int, str]:
    """``run_cli`` in a forked child (Ctrl-C at fault point ``kill_at`` when given): (exit code, stderr)."""
    err_file = Path("child.err")
    pid = os.fork()
    if pid == 0:
        code = 99
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
            os.dup2(os.open(str(err_file), os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
            sys.stderr = os.fdopen(2, "w", buffering=1)  # not pytest's capture
            if kill_at:
                os.environ.update(INSTILL_KILL_AT=str(kill_at), INSTILL_KILL_SIGNAL="SIGINT")
            files._fault_count = 0
            code = run_cli(stage, *args)
        finally:
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), err_file.read_text()


def test_ctrl_c_after_the_last_write_is_130_and_says_the_run_finished(workdir):
    before = files._fault_count
    assert run_cli("base", TINY, "--set", "train.epochs=1", "--out", "checkpoints/whole") == 0
    last = files._fault_count - before
    code, err = run_in_child([TINY, "--set", "train.epochs=1", "--out", "checkpoints/late"], kill_at=last)
    assert code == 130, err
    assert err.strip() == "interrupted after the run finished: checkpoints/late is complete", err


def test_ctrl_c_swallowed_by_a_finalizer_during_the_final_plots_still_ends_with_130(workdir, monkeypatch):
    """Python only prints "Exception ignored" for a KeyboardInterrupt raised in a finalizer; the run goes on."""
    import instill.stages.base as base

    class InterruptedWhenCollected:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)

    def plot_run(path):
        InterruptedWhenCollected()  # collected at once: the Ctrl-C lands in its __del__

    monkeypatch.setattr(base, "plot_run", plot_run)
    code, err = run_in_child([TINY, "--set", "train.epochs=1", "--out", "checkpoints/plots"])
    assert code == 130, err
    assert err.strip().splitlines()[-1] == "interrupted after the run finished: checkpoints/plots is complete", err


# ----------------------------------------------------------------------------------------------- reproduce


def test_a_claim_whose_metric_its_stage_never_writes_fails_validation_with_the_nearest_names(workdir, capsys):
    Path("m.yaml").write_text(TINY_MANIFEST.replace("metric: test_acc", "metric: test_acc_typo"))
    assert reproduce_main(["--manifest", "m.yaml", "--validate"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "claim tiny_parity: its guide stage writes no metric 'test_acc_typo'; nearest: test_acc" in err, err
    assert not Path("checkpoints").exists()


def test_a_verdict_never_says_not_run_about_runs_that_ran():
    # compare declares no figures (Stage.figures), so a typo in its metric is found only once its runs finished
    claim = Claim(id="c", system="s", claim="x", config="a.yaml", stage="compare", metric="test_acc_typo",
                  treatment={"condition": "subnet"}, control={"condition": "random_init"}, margin=0.1,
                  paper={"source": "Fig. 2"})
    ran = [{"point": "a-random_seed=1", "state": "finished", "seed": 1, "condition": c, "test_acc": 0.5}
           for c in ("subnet", "random_init")]
    result = claim_result(claim, ran, "a")
    assert "not run" not in result["verdict"]
    assert result["verdict"] == "no value: its runs finished but write no test_acc_typo (nearest: test_acc)"


# ------------------------------------------------------------------------------------------ smaller things


def test_an_upstream_that_cannot_start_is_refused_without_announcing_it_or_leaving_a_lock(workdir, capsys):
    Path("not_a_run").mkdir()
    text = Path("configs/tiny_shapes_ablate.yaml").read_text().replace("configs/tiny_shapes_base.yaml", "not_a_run")
    Path("configs/tiny_shapes_ablate.yaml").write_text(text)
    assert run_cli("transfer", "configs/tiny_shapes_transfer.yaml") == 2
    out, err = capsys.readouterr()
    assert len(err.strip().splitlines()) == 1 and "not_a_run is not a finished run directory" in err, err
    assert "so running" not in out, out
    assert not Path("checkpoints").exists(), list(Path("checkpoints").rglob("*"))


def test_resume_accepts_a_set_equal_to_what_the_run_recorded_after_resolution(workdir):
    """Up-arrow and --resume: guide_run=<config> was recorded as the run directory it resolved to."""
    from instill.config import to_yaml
    from instill.stages.runner import _resumed_config, load_stage_config

    Path("checkpoints/tiny_digits").mkdir(parents=True)
    Path("checkpoints/tiny_digits/config.yaml").write_text(to_yaml(load_stage_config(TINY, "base")))
    cfg = load_stage_config("configs/tiny_guide_digits.yaml", "guide", out="checkpoints/g")
    cfg.guidance.guide_run = "checkpoints/tiny_digits"  # as prepare() resolved it
    Path("checkpoints/g").mkdir()
    Path("checkpoints/g/config.yaml").write_text(to_yaml(cfg))
    same = ["guidance.guide_run=configs/tiny_digits.yaml", "train.epochs=2"]
    assert _resumed_config(cfg, same).guidance.guide_run == "checkpoints/tiny_digits"
    with pytest.raises(UserError, match="would change guidance.guide_run from 'checkpoints/tiny_digits' to "
                                        "'configs/tiny_guide_parity.yaml'"):
        _resumed_config(cfg, ["guidance.guide_run=configs/tiny_guide_parity.yaml"])


def test_an_integer_layer_index_is_refused_in_one_line():
    from instill.compare.measures import compare_models

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    with pytest.raises(UserError, match=r"layer 0 is not a layer name or type: .*\(the module named '0'\?\)"):
        compare_models(model, model, [torch.randn(8, 4)], layers_a=[0, 2], measures=["cka_minibatch"])


def test_the_root_modules_own_weights_are_maskable():
    from instill.subnetworks.masks import MaskConfig, MaskedModel, select_targets

    assert [t.name for t in select_targets(torch.nn.Linear(4, 3), ["Linear"])] == ["weight"]
    masked = MaskedModel(torch.nn.Linear(4, 3), MaskConfig(layers=["Linear"]))
    assert masked(torch.randn(2, 4)).shape == (2, 3)


def test_report_plot_never_touches_a_finished_run_and_names_symlink_loops(workdir, capsys):
    from instill.report import main as report_main

    assert run_cli("base", TINY, "--set", "train.epochs=1", "--out", "checkpoints/done") == 0
    before = {p: p.read_bytes() for p in Path("checkpoints/done").iterdir()}
    os.symlink("loop", "checkpoints/loop")  # a link to itself
    os.symlink(".", "checkpoints/self")  # a link to the folder it is in
    capsys.readouterr()
    assert report_main(["checkpoints", "--plot"]) == 0
    out, err = capsys.readouterr()
    assert {p: p.read_bytes() for p in Path("checkpoints/done").iterdir()} == before
    assert Path("reports/curves/done-curves.png").is_file()
    assert "skipped checkpoints/loop: a symbolic link loop" in err, err
    assert "skipped checkpoints/self: a symbolic link to a folder already listed (a loop)" in err, err


def test_ctrl_c_of_a_slurm_sweep_cancels_its_jobs(workdir, monkeypatch, capsys):
    """No cluster needed: the jobs are stand-ins for submitit's; the waiting loop gets the Ctrl-C."""
    import instill.sweep as sweep_module

    class Job:
        cancelled: list[str] = []

        def __init__(self, job_id):
            self.job_id = job_id

        def done(self):
            raise KeyboardInterrupt  # the Ctrl-C lands while the sweep waits

        def cancel(self, check=True):
            Job.cancelled.append(self.job_id)

    write_sweep(f"config: {TINY}\nstage: base\ngrid: {{reproducibility.random_seed: [1, 2]}}")
    sweep = sweep_module.prepare("s.yaml", executor="local")
    sweep.path.mkdir(parents=True)
    (sweep.path / "points").mkdir()
    monkeypatch.setattr(sweep_module, "live_slurm_jobs", lambda path, names: {})
    monkeypatch.setattr(sweep_module, "_submit_array",
                        lambda sweep, todo, folder: {name: Job(f"7_{i}") for i, name in enumerate(todo)})
    with pytest.raises(KeyboardInterrupt):
        sweep_module._run_slurm(sweep, [p["name"] for p in sweep.points], lambda outcome: None)
    assert Job.cancelled == ["7_0", "7_1"]
    states = {json.loads(p.read_text())["state"] for p in (sweep.path / "points").iterdir()}
    assert states == {"interrupted"}


def _claim_many(tag: str) -> int:
    from instill.run import claim_run_dir

    failures = 0
    for i in range(100):
        try:
            _, _, lock, _ = claim_run_dir(f"p/{tag}-{i}", False, lambda d: (d / "seed.txt").write_text("1\n"))
            lock.release()
        except Exception:  # noqa: BLE001 - any failure counts
            failures += 1
    return failures


def test_two_launches_building_run_directories_side_by_side_never_remove_each_others(workdir):
    """Found by the sweep's kill/resume test (a point failed at once with 'No such file or directory'): a launch
    clearing stale staging directories could lock and remove one that another launch had created but not locked."""
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(2) as pool:
        assert pool.map(_claim_many, ["a", "b"]) == [0, 0]
