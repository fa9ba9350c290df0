"""Nothing lost, nothing mixed, one line for every hostile input (issue 11): run-directory ownership, what may be
removed or rewritten, unreadable checkpoints, unwritable places, FIFOs and symlink loops, Ctrl-C while importing,
batches larger than the training set, and the messages that must say what happened."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import types

import torch

from instill.errors import UserError
from instill.run import LOCK_FILE, RunLock, claim_run_dir, read_metrics
from tests.conftest import CONFIGS, REPO, forked_at_once, python_env, run_cli

TINY = "configs/tiny_digits.yaml"
ONE_EPOCH = ["--set", "train.epochs=1"]
MAGNITUDE_ABLATE = ("base: {base}\ndata: {{name: digits, limit: 400}}\n"
                    "mask: {{layers: [Linear], method: magnitude, prune_fraction: 0.5}}\n"
                    "train: {{epochs: 1, threads: 1}}\n")


@pytest.fixture(scope="module")
def finished_base(tmp_path_factory):
    """A finished one-epoch base run of tiny_digits, copied by the tests that need one."""
    folder = tmp_path_factory.mktemp("base")
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        shutil.copytree(CONFIGS, "configs")
        assert run_cli("base", TINY, *ONE_EPOCH, "--out", "run") == 0
    finally:
        os.chdir(cwd)
    return folder / "run"


def one_line(capsys, *fragments: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, err
    return err


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail instead of hanging (a FIFO read blocks forever)."""
    def timeout(signum, frame):
        raise AssertionError(f"still running after {seconds} s: it hangs")

    previous = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def tmpfs(path: Path, options: str):
    """A tmpfs mounted at ``path`` (root only: skipped elsewhere)."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


# --------------------------------------------------------------------------------------------- item 1: ownership


def test_two_launches_on_one_out_at_once_never_mix_data(workdir):
    """Two real processes started together on one --out: the second gets one line naming the first, exit 2."""
    args = [sys.executable, str(REPO / "vision/vision_base.py"), TINY, "--set", "train.epochs=400",
            "--set", "train.progress=false", "--out", "checkpoints/same"]
    procs = [subprocess.Popen(args, env=python_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    try:
        deadline_at = time.time() + 240
        while all(p.poll() is None for p in procs) and time.time() < deadline_at:
            time.sleep(0.05)
        loser = next(p for p in procs if p.poll() is not None)
        winner = next(p for p in procs if p is not loser)
        assert winner.poll() is None, "both ended: the runs did not overlap"
        err = loser.stderr.read().strip()
        assert loser.returncode == 2 and len(err.splitlines()) == 1, err
        assert f"checkpoints/same is in use by process {winner.pid} " in err, err
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
            p.wait()
    rows = read_metrics("checkpoints/same")
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)), "rows of two runs in one metrics.jsonl"
    assert not list(Path("checkpoints").glob(".instill-staging-*"))


def test_a_run_directory_in_use_refuses_a_replay_a_resume_and_a_launch(workdir, finished_base, capsys):
    shutil.copytree(finished_base, "checkpoints/a")
    # A replay in progress (this process holds -replay-1, as the first of two concurrent replays would).
    path, replay_of, lock, _ = claim_run_dir("checkpoints/a", False, lambda d: (d / "seed.txt").write_text("1\n"))
    assert (path, replay_of) == (Path("checkpoints/a-replay-1"), Path("checkpoints/a"))
    before = snapshot(path)
    assert run_cli("base", "checkpoints/a/config.yaml", "--out", "checkpoints/a") == 2
    one_line(capsys, f"checkpoints/a-replay-1 is in use by process {os.getpid()} ")
    assert snapshot(path) == before and not Path("checkpoints/a-replay-2").exists()
    lock.release()
    # A resume in progress: a second --resume must not touch the run.
    shutil.copytree(finished_base, "checkpoints/u")
    os.remove("checkpoints/u/summary.json")  # unfinished, with saved state
    held = RunLock.take(Path("checkpoints/u"))  # as the first --resume holds it
    before = snapshot(Path("checkpoints/u"))
    for extra in (["--resume"], []):
        assert run_cli("base", "checkpoints/u/config.yaml", "--out", "checkpoints/u", *extra) == 2
        one_line(capsys, f"checkpoints/u is in use by process {os.getpid()} ")
    assert snapshot(Path("checkpoints/u")) == before
    held.release()
    assert run_cli("base", "checkpoints/u/config.yaml", "--out", "checkpoints/u", "--resume") == 0


def test_the_lock_is_free_once_its_process_is_gone(tmp_path):
    out = tmp_path / "r"
    pid = os.fork()
    if pid == 0:  # a process that claims the directory and dies without any cleanup
        try:
            claim_run_dir(out, False, lambda d: None)
        finally:
            os.kill(os.getpid(), signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    assert os.WTERMSIG(status) == signal.SIGKILL and (out / LOCK_FILE).is_file()
    lock = RunLock.try_take(out)  # killed: the kernel released its lock
    assert lock is not None
    lock.release()


# --------------------------------------------------------------------------- items 2, 3: what may be removed


def test_a_staging_directory_renamed_into_place_while_another_launch_cleans_up(tmp_path, monkeypatch):
    """Two sweep workers creating runs side by side: the one cleaning up stale staging directories must not fail
    when the other's staging directory is renamed into place between listing and looking (seen in a 2-worker
    reproduce run as a missing-folder error)."""
    from instill import run

    staging = tmp_path / f"{run.STAGING_PREFIX}abc"
    staging.mkdir()

    def renamed_meanwhile(directory, create=False, record=True):
        os.rename(staging, tmp_path / "the_run")  # the other launch won the race
        raise FileNotFoundError(directory / LOCK_FILE)

    monkeypatch.setattr(run.RunLock, "try_take", staticmethod(renamed_meanwhile))
    run._remove_stale_staging(tmp_path)
    assert (tmp_path / "the_run").is_dir()


def test_a_staging_directory_killed_between_creating_and_naming_its_lock_is_cleared(tmp_path):
    import fcntl

    from instill import run

    dead, alive = (tmp_path / f"{run.STAGING_PREFIX}{name}" for name in ("dead", "alive"))
    for staging in (dead, alive):
        staging.mkdir()
        (staging / f"{LOCK_FILE}.new").write_text("")
        os.utime(staging / f"{LOCK_FILE}.new", (time.time() - 10, time.time() - 10))
    held = os.open(alive / f"{LOCK_FILE}.new", os.O_RDWR)
    try:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # its launch is alive (as between open and rename)
        run._remove_stale_staging(tmp_path)
        assert not dead.exists() and alive.is_dir()
    finally:
        os.close(held)


def test_a_users_folder_with_a_seed_txt_is_never_deleted(workdir, capsys):
    folder = Path("mydata")
    folder.mkdir()
    (folder / "seed.txt").write_text("42\n")
    (folder / "results_2023.csv").write_text("a,b\n1,2\n")
    before = snapshot(folder)
    assert run_cli("base", TINY, *ONE_EPOCH, "--out", "mydata") == 2
    one_line(capsys, "mydata was not created by this version of instill", "never overwritten")
    assert snapshot(folder) == before


def test_a_damaged_upstream_run_is_never_deleted_or_rerun(workdir, finished_base, capsys):
    shutil.copytree(finished_base, "checkpoints/tiny_digits")  # where configs/tiny_digits.yaml writes
    base = Path("checkpoints/tiny_digits")
    (base / "summary.json").write_text('{"status": "fini')  # cut off
    os.remove(base / "state.pt")  # like a magnitude ablation, which saves no state
    (base / "notes.txt").write_text("my notes")
    before = snapshot(base)
    Path("ablate.yaml").write_text(MAGNITUDE_ABLATE.format(base="configs/tiny_digits.yaml"))
    assert run_cli("ablate", "ablate.yaml") == 2
    one_line(capsys, "checkpoints/tiny_digits is a damaged run", "nothing in it is touched")
    assert run_cli("base", TINY) == 2
    one_line(capsys, "is a damaged run")
    # beside it only the lock by which parallel sweep points wait for one upstream run (stages.upstream)
    assert snapshot(base) == before and sorted(os.listdir("checkpoints")) in (["tiny_digits"],
                                                                             [".tiny_digits.lock", "tiny_digits"])


def test_an_abandoned_run_of_ours_is_reused_but_a_finished_one_replayed(workdir, finished_base, capsys):
    shutil.copytree(finished_base, "checkpoints/f")
    assert run_cli("base", "checkpoints/f/config.yaml", "--out", "checkpoints/f") == 0  # finished: replayed beside it
    assert json.loads(Path("checkpoints/f-replay-1/replay.json").read_text())["matches"] is True
    abandoned = Path("checkpoints/abandoned")  # killed before its first saved state
    abandoned.mkdir()
    (abandoned / LOCK_FILE).touch()
    (abandoned / "seed.txt").write_text("7\n")
    assert run_cli("base", TINY, *ONE_EPOCH, "--out", str(abandoned)) == 0
    assert Path(abandoned / "summary.json").is_file()


# ------------------------------------------------------------------------- item 13: unreadable checkpoints


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage"])
def test_an_unreadable_model_safetensors_is_one_line_and_writes_nothing(workdir, finished_base, capsys, damage):
    bad = Path("checkpoints/bad")
    shutil.copytree(finished_base, bad)
    weights = bad / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"empty": b"", "truncated": data[: len(data) // 2], "garbage": os.urandom(len(data))}[damage])
    Path("ablate.yaml").write_text(MAGNITUDE_ABLATE.format(base="checkpoints/bad"))
    assert run_cli("ablate", "ablate.yaml") == 2
    one_line(capsys, "checkpoints/bad/model.safetensors is not a readable safetensors file")
    assert run_cli("guide", "configs/tiny_guide_digits.yaml", "--set", "guidance.guide_run=checkpoints/bad") == 2
    one_line(capsys, "checkpoints/bad/model.safetensors is not a readable safetensors file")
    from instill.models import load_model  # what transfer's prepare loads its mask's base run with

    with pytest.raises(UserError, match="not a readable safetensors file"):
        load_model(bad)
    assert sorted(os.listdir("checkpoints")) == ["bad"]


# ------------------------------------------------------------------------------ item 14: unwritable places


def test_an_out_below_a_file_or_with_a_too_long_name_is_one_line(workdir, capsys):
    Path("afile").write_text("x")
    assert run_cli("base", TINY, *ONE_EPOCH, "--out", "afile/run") == 2
    one_line(capsys, "cannot write afile/run: afile is a file, not a folder")
    assert run_cli("base", TINY, *ONE_EPOCH, "--out", "checkpoints/" + "x" * 300) == 2
    one_line(capsys, "File name too long")
    assert not any(Path("checkpoints").iterdir())


def test_a_read_only_output_location_is_one_line(workdir, capsys):
    if os.geteuid() != 0:  # permissions stop anyone but root
        Path("ro").mkdir()
        os.chmod("ro", 0o555)
        assert run_cli("base", TINY, *ONE_EPOCH, "--out", "ro/run") == 2
        one_line(capsys, "cannot write ro/run", "Permission denied")
        return
    with tmpfs(Path("ro"), "ro,size=1m"):  # root writes anywhere but on a read-only file system
        assert run_cli("base", TINY, *ONE_EPOCH, "--out", "ro/run") == 2
        one_line(capsys, "cannot write ro/run", "Read-only file system")


def test_a_full_disk_at_a_checkpoint_is_one_line_and_leaves_nothing(workdir, capsys):
    with tmpfs(Path("small"), "size=48k"):
        assert run_cli("base", TINY, *ONE_EPOCH, "--out", "small/run") == 2
        one_line(capsys, "cannot write small/run/", "No space left on device")
        assert os.listdir("small") == []  # no run directory, no staging directory, no temporary file


def test_a_full_disk_in_the_data_cache_costs_only_time(workdir):
    from instill.data.cache import cached_tensors

    with tmpfs(Path("cache"), "size=8k"):
        with pytest.warns(UserWarning, match="could not write the data cache"):
            tensors = cached_tensors("cache", "test", {"k": 1}, lambda: {"x": torch.zeros(10000)})
        assert tensors["x"].shape == (10000,) and os.listdir("cache") == []


def test_write_errors_mid_run_are_one_line(workdir, monkeypatch, capsys):
    """The same without a tmpfs: torch.save fails the way it does on a full disk."""
    import instill.files

    def full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")

    monkeypatch.setattr(torch, "save", full)
    monkeypatch.setattr(instill.files, "_disk_full", lambda directory: True)
    assert run_cli("base", TINY, *ONE_EPOCH, "--out", "checkpoints/r") == 2
    one_line(capsys, "cannot write checkpoints/r/state.pt: No space left on device")
    assert os.listdir("checkpoints") == []


# ----------------------------------------------------------------------- item 15: symlink loops and FIFOs


def test_config_symlink_loops_and_fifos_are_one_line_without_hanging(workdir, capsys):
    os.symlink("loop.yaml", "loop.yaml")
    os.mkfifo("fifo.yaml")
    Path("extends_loop.yaml").write_text("extends: loop.yaml\n")
    Path("extends_fifo.yaml").write_text("extends: fifo.yaml\n")
    with deadline(60):
        for config, message in [("loop.yaml", "Too many levels of symbolic links"),
                                ("extends_loop.yaml", "Too many levels of symbolic links"),
                                ("fifo.yaml", "not a regular file"), ("extends_fifo.yaml", "not a regular file")]:
            assert run_cli("base", config) == 2
            one_line(capsys, message)


def test_report_plot_does_not_hang_on_a_fifo(workdir, finished_base, capsys):
    from instill.report import main as report_main

    shutil.copytree(finished_base, "checkpoints/r")
    os.remove("checkpoints/r/metrics.jsonl")
    os.mkfifo("checkpoints/r/metrics.jsonl")
    with deadline(60):
        assert report_main(["checkpoints", "--plot"]) == 0
    assert "broken (metrics.jsonl is not a file)" in capsys.readouterr().out


# --------------------------------------------------------------------------- item 16: Ctrl-C while importing


def test_ctrl_c_while_importing_prints_no_traceback(workdir):
    proc = subprocess.Popen([sys.executable, str(REPO / "guide.py"), "configs/tiny_guide_parity.yaml"],
                            env=python_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.8)  # torch takes seconds to import
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert "interrupted" in err and not Path("checkpoints").exists()


# ---------------------------------------------------------------------- item 6: batches and training sets


def test_a_batch_larger_than_the_training_set(workdir, capsys):
    for conditions in ("[unguided, guided_untrained]", "[unguided]"):  # checked in prepare; by the loop
        assert run_cli("guide", "configs/tiny_guide_parity.yaml", "--set", "train.batch_size=1000",
                       "--set", f"guidance.conditions={conditions}") == 2
        one_line(capsys, "train.batch_size 1000 is larger than the training set of 128 examples")
        assert not Path("checkpoints").exists() or not any(Path("checkpoints").iterdir())
    # Without drop_last, the one partial batch is used: an optimizer step per epoch.
    assert run_cli("base", TINY, "--set", "train.epochs=2", "--set", "train.batch_size=100000",
                   "--out", "checkpoints/partial") == 0
    assert json.loads(Path("checkpoints/partial/summary.json").read_text())["steps"] == 2


# ------------------------------------------------------------------------------- item 17: clear messages


def test_resume_messages(workdir, finished_base, capsys):
    assert run_cli("base", TINY, "--out", "checkpoints/never", "--resume") == 2
    one_line(capsys, "--resume: checkpoints/never does not exist")
    shutil.copytree(finished_base, "checkpoints/u")
    os.remove("checkpoints/u/summary.json")
    assert run_cli("base", TINY, "--out", "checkpoints/u", "--resume", "--set", "train.optimizer.lr=0.5") == 2
    one_line(capsys, "--set train.optimizer.lr=0.5 would change train.optimizer.lr from 0.003 to 0.5")


def test_upstream_of_the_wrong_stage_and_data_of_the_wrong_kind(workdir, capsys):
    Path("ablate.yaml").write_text(MAGNITUDE_ABLATE.format(base="configs/tiny_digits.yaml"))
    assert run_cli("guide", "configs/tiny_guide_digits.yaml", "--set", "guidance.guide_run=ablate.yaml") == 2
    one_line(capsys, "guidance.guide_run: ablate.yaml is a config of the ablate stage")
    assert run_cli("transfer", "configs/tiny_shapes_transfer.yaml", "--set", f"transfer.mask={TINY}") == 2
    one_line(capsys, f"transfer.mask: {TINY} is a config of the base stage")
    assert not Path("checkpoints").exists()
    from instill.stages.compatibility import check_data_fits

    with pytest.raises(UserError, match="these data are token sequences, but the base model was built for images"):
        check_data_fits({"input_shape": [1, 8, 8], "num_classes": 10},
                        {"input_shape": [4], "vocab_size": 21, "num_classes": 7}, "the base model")


def test_a_nan_stop_in_a_sweep_says_what_is_kept(workdir, monkeypatch, capsys):
    from instill.guidance import guide

    made = []

    def diverging_after(first_ok: int):
        def make_loss(scope):
            made.append(scope)
            real = guide.__dict__["_real_make_loss"](scope)
            if len(made) <= first_ok:
                return real

            def loss(model, batch):
                value, logs = real(model, batch)
                return value * float("nan"), logs
            return loss
        return make_loss

    monkeypatch.setitem(guide.__dict__, "_real_make_loss", guide.make_loss)
    monkeypatch.setattr(guide, "make_loss", diverging_after(0))
    args = ["configs/tiny_guide_parity.yaml", "--set", "train.epochs=2"]
    assert run_cli("guide", *args, "--out", "checkpoints/first") == 2
    one_line(capsys, "no state had been saved yet, so nothing of the run is kept")
    assert not Path("checkpoints/first").exists()
    made.clear()
    monkeypatch.setattr(guide, "make_loss", diverging_after(1))
    assert run_cli("guide", *args, "--out", "checkpoints/second") == 2
    one_line(capsys, "no state of this sub-run had been saved; run checkpoints/second keeps the finished ones")
    assert Path("checkpoints/second/unguided/summary.json").is_file()


def test_an_empty_mask_is_announced(workdir, monkeypatch, capsys):
    from instill.subnetworks import transfer

    cfg = transfer.Config.model_validate({"stage": "transfer", "data": {"name": "digits", "limit": 100},
                                          "transfer": {"mask": "m", "conditions": ["subnet", "random_init"]}})
    monkeypatch.setattr(transfer, "resolve_upstream", lambda ref, stage, key, *_: ref)
    no_base = types.SimpleNamespace(model=None)  # a weight mask's checks never read the base model
    monkeypatch.setattr(transfer, "_inputs", lambda d: transfer.TransferInputs(
        no_base, {"w": torch.zeros(3, 3, dtype=torch.bool)}, "weight"))
    monkeypatch.setattr(transfer, "check_condition", lambda condition, mask: None)
    transfer.prepare(cfg)
    one_line(capsys, "warning: the mask in m keeps no weight (density 0)")


# ---------------------------------------------------------------------------------- permissions (umask)


def test_every_file_of_a_run_follows_the_umask(workdir):
    previous = os.umask(0o027)
    try:
        assert run_cli("guide", "configs/tiny_guide_parity.yaml", "--out", "checkpoints/perm") == 0
    finally:
        os.umask(previous)
    root = Path("checkpoints/perm")
    modes = {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}
    wrong = {name: oct(mode) for name, mode in modes.items()
             if mode != (0o750 if (root / name).is_dir() else 0o640)}
    assert not wrong, wrong
    assert {LOCK_FILE, "state.pt", "metrics.jsonl", "summary.json"} <= {Path(n).name for n in modes}


INTERRUPT_WHILE_IMPORTING = """
import os, runpy, signal, sys

class PressCtrlC:  # Ctrl-C the moment the first heavy import starts, as a user would in the first seconds
    def find_spec(self, name, path=None, target=None):
        if name in ("torch", "numpy", "pydantic"):
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
        return None

sys.meta_path.insert(0, PressCtrlC())
runpy.run_module(sys.argv[1], run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize("module", ["instill.report", "instill.reproduce", "instill.sweep", "instill.layers"])
def test_ctrl_c_while_a_python_m_tool_imports_prints_one_line(module, workdir):
    run = subprocess.run([sys.executable, "-c", INTERRUPT_WHILE_IMPORTING, module, "checkpoints"], env=python_env(),
                         capture_output=True, text=True, timeout=120)
    assert (run.returncode, run.stderr) == (130, "\ninterrupted\n"), run.stderr


def test_a_data_cache_write_killed_part_way_is_cleaned_up_and_two_at_once_make_one_file(workdir):
    """A writer SIGKILLed mid-write leaves only its temporary file, which the next writer removes (a live writer's
    is kept); two writers of one key at once leave one file that reads back."""
    import multiprocessing

    from instill.data import cache

    forked = multiprocessing.get_context("fork")
    tensors = {"x": torch.arange(100_000, dtype=torch.float32)}

    def killed_part_way():
        def half_written(_, path):
            Path(path).write_bytes(b"half")
            time.sleep(60)

        cache.save_file = half_written  # in the child only
        cache.write_cached("cache", "test", {"k": 1}, tensors)

    child = forked.Process(target=killed_part_way)
    child.start()
    deadline = time.time() + 30
    while not [p for p in Path("cache").glob("*.tmp") if p.stat().st_size] and time.time() < deadline:
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    (left,) = Path("cache").glob("*.tmp")
    live = Path("cache") / left.name.replace(f".{child.pid}.", f".{os.getpid()}.")
    live.write_bytes(b"being written")
    assert cache.read_cached("cache", "test", {"k": 1}) is None  # nothing half-made passes for a cache file

    assert forked_at_once(lambda: cache.write_cached("cache", "test", {"k": 1}, tensors)) == [0, 0]
    assert sorted(p.name for p in Path("cache").iterdir()) == sorted([cache.cache_path("cache", "test", {"k": 1}).name,
                                                                     live.name])
    assert torch.equal(cache.read_cached("cache", "test", {"k": 1})["x"], tensors["x"])
