"""Run directories: seed, config snapshot, environment, metrics log, weights, resume state, replay check.

The contract (docs/design.md): ``config.yaml`` (resolved, with ``reproduce: true`` and the seed filled in, so
rerunning it replays the run), ``seed.txt``, ``env.json``, ``metrics.jsonl`` + ``metrics.csv``, ``summary.json``,
weights as safetensors, ``state.pt``, plots. A run is finished once ``summary.json`` says so; a finished run is never
overwritten: running its very config again writes ``<dir>-replay-<k>`` and compares the metrics, and any other run
aimed at it writes ``<dir>-<k>``. Every file is written atomically (temporary file, then rename), so an interrupted
run leaves either the old file or the new one.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import json
import math
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch

from . import dist
from .errors import UserError
from .files import (atomic_save, atomic_save_safetensors, atomic_write_csv, atomic_write_json, atomic_write_text,
                    fault_point, json_default, make_directory, read_json, read_regular_bytes, remove_quietly,
                    user_mode, write_error)
from .seeds import STATE_GLOBALS

TIMING_PREFIX = "time_"  # metrics whose names start with this are wall-clock figures, not compared on replay



# ---------------------------------------------------------------------------------------------------------------
# Run directory: who owns it, what it holds

LOCK_FILE = ".instill-run"  # in every run directory instill creates: marks it as instill's, locked by its writer
STAGING_PREFIX = ".instill-staging-"  # a run directory being built, renamed into place once complete


def is_finished(path: str | Path) -> bool:
    summary = read_json(Path(path) / "summary.json")
    return bool(summary) and summary.get("status") == "finished"


def has_state(path: str | Path) -> bool:
    """Saved training state in the run directory or in one of its sub-runs."""
    path = Path(path)
    return (path / "state.pt").is_file() or any(path.glob("*/state.pt"))


def sub_runs(path: str | Path) -> list[Path]:
    """The sub-run directories of a sweep (each holds its own metrics, state or summary)."""
    return sorted(p for p in Path(path).iterdir() if p.is_dir() and any(
        (p / f).is_file() for f in ("summary.json", "state.pt", "metrics.jsonl")))


def run_state(path: str | Path) -> str:
    """``finished``; ``damaged`` (a summary.json that does not say finished: unreadable, cut off, not a file);
    ``unfinished`` (saved training state to continue from); or ``empty`` (no work saved yet)."""
    path = Path(path)
    if os.path.lexists(path / "summary.json"):
        return "finished" if is_finished(path) else "damaged"
    return "unfinished" if has_state(path) else "empty"


class RunLock:
    """An exclusive lock (``flock``) on a run directory's LOCK_FILE, held by the one process that writes the run.

    The kernel drops the lock when its process ends, however it ends (kill -9 included): a lock that cannot be
    taken always has a live owner, and a directory whose lock is free has none. The file names the owner (pid,
    host, start) for the message a second process gets.
    """

    def __init__(self, fd: int, directory: Path):
        self.fd: Optional[int] = fd
        self.directory = directory

    @classmethod
    def try_take(cls, directory: Path, create: bool = False, record: bool = True, file: str = LOCK_FILE
                 ) -> Optional["RunLock"]:
        """The lock, or None while another process holds it; ``record``: name this process in the file (not done
        when only looking: a finished or damaged run stays byte for byte as it was).

        Raises:
            FileNotFoundError: the directory has no lock file (and ``create`` is false).
            OSError: the lock file cannot be opened.
        """
        flags = os.O_RDWR | (os.O_CREAT if create else 0) | getattr(os, "O_NOFOLLOW", 0)
        fd = os.open(directory / file, flags, user_mode())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        lock = cls(fd, directory)
        if record:
            lock.record()
        return lock

    @classmethod
    def create_new(cls, directory: Path) -> "RunLock":
        """The lock of a directory just made (a staging directory): the file is locked before it appears under its
        name, so that another launch clearing stale staging directories never finds it created but not yet
        locked (it would take the lock and remove the directory being built)."""
        tmp = directory / f"{LOCK_FILE}.new"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), user_mode())
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.rename(tmp, directory / LOCK_FILE)
        lock = cls(fd, directory)
        lock.record()
        return lock

    def record(self) -> None:
        """Name this process as the owner in the lock file (what a second launch is told)."""
        owner = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": _now()}).encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, owner + b"\n", 0)

    @classmethod
    def take(cls, directory: Path, create: bool = False, record: bool = True, file: str = LOCK_FILE) -> "RunLock":
        """The lock; a UserError naming the live process that holds it otherwise."""
        lock = cls.try_take(directory, create, record, file)
        if lock is None:
            raise UserError(f"{directory} is in use by {lock_owner(directory, file)}: wait for it to end, or choose "
                            "another --out")
        return lock

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the only descriptor of the open file drops the flock
            self.fd = None


def lock_owner(directory: Path, file: str = LOCK_FILE) -> str:
    """Who holds the lock of ``directory``, as the lock file records it."""
    try:
        owner = json.loads(read_regular_bytes(directory / file))
        return f"process {owner['pid']} on {owner['host']} (since {owner['since']})"
    except (OSError, ValueError, KeyError, TypeError):  # the owner is writing its record right now
        return "another process"


def claim_run_dir(output_dir: str | Path, resume: bool, populate: Callable[..., None],
                  config_yaml: Optional[str] = None) -> tuple[Path, Optional[Path], RunLock, bool]:
    """Take ownership of the run directory this launch writes: (directory, original run being replayed or None,
    its lock, whether it holds state to resume from). ``populate(dir)`` writes a new run's first files.

    A new directory is built under a hidden name and renamed into place, so it appears complete and already locked;
    a finished run is replayed into ``<dir>-replay-<k>`` when this launch is that very run (``config_yaml``, seed
    included, is its recorded ``config.yaml``; see ``is_replay_of``), and any other launch aimed at it is a new run
    in ``<dir>-<k>`` (k = 2, 3, ...), whose snapshot names that directory (``populate(dir, final=...)``) and which is
    compared with nothing; only a directory instill created (it has LOCK_FILE) that
    holds no saved state and no summary is ever emptied and reused. ``--resume`` of a directory that holds no saved
    state yet starts it again from its own config and seed.

    Raises:
        UserError: another live process owns the directory (named); it holds an unfinished run (without
            ``resume``), a finished, damaged or foreign one (with it); it is not instill's; it cannot be created.
    """
    out = Path(output_dir)
    if resume:
        return _claim_for_resume(out, populate)
    candidate, replay_of, renamed, k = out, None, False, 0
    for _ in range(1000):  # each pass claims, moves on to the next replay name, or retries a vanished directory
        fill = (lambda d, final=candidate: populate(d, final=final)) if renamed else populate
        lock = _create(candidate, fill)
        if lock is not None:
            return candidate, replay_of, lock, False
        status, lock = _inspect(candidate)
        if status == "gone":
            continue
        if status == "empty":
            lock.record()
            _reset(candidate, fill)
            return candidate, replay_of, lock, False
        if lock is not None:
            lock.release()
        if status == "finished" and replay_of is None and not renamed \
                and config_yaml is not None and not is_replay_of(candidate, config_yaml):
            renamed, k = True, 1  # another run beside a finished one: a new name, no comparison
        if renamed:  # an interrupted new run keeps its name too
            k += 1
            candidate = Path(f"{out}-{k}")
            continue
        if status == "finished" or replay_of is not None:  # an interrupted replay keeps its name too
            replay_of = replay_of or candidate
            k += 1
            candidate = Path(f"{out}-replay-{k}")
            continue
        raise UserError(f"{out} holds an unfinished run: continue it with --resume, or choose another --out")
    raise UserError(f"{out}: could not claim a run directory (it keeps changing under another process)")


def is_replay_of(run_dir: Path, config_yaml: str) -> bool:
    """Whether ``config_yaml`` (a resolved snapshot, seed included) asks for the run recorded in ``run_dir``: every
    recorded key has the same value (keys the recorded snapshot lacks, options added since, are not compared; nor is
    ``output_dir``, which says where a run is written, not what it computes: a moved run directory replays too, nor
    ``train.threads``: a replay at another count is one, and says that its bits are then not expected to match)."""
    import yaml

    try:
        recorded = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return False
    if not isinstance(recorded, dict):
        return False
    recorded = {k: v for k, v in recorded.items() if k != "output_dir"}
    if isinstance(recorded.get("train"), dict):  # the thread count changes bits, not what is computed: a replay at
        recorded["train"] = {k: v for k, v in recorded["train"].items() if k != "threads"}  # another says so
    return _holds(yaml.safe_load(config_yaml), recorded)


def _holds(new: Any, recorded: Any) -> bool:
    if isinstance(recorded, dict):
        return isinstance(new, dict) and all(k in new and _holds(new[k], v) for k, v in recorded.items())
    return new == recorded


def _with_output_dir(config_yaml: str, path: Path) -> str:
    """The snapshot of a run renamed beside a finished one: its output_dir is its own directory, so it replays."""
    import yaml

    snapshot = yaml.safe_load(config_yaml)
    if not isinstance(snapshot, dict) or "output_dir" not in snapshot:
        return config_yaml
    snapshot["output_dir"] = str(path)
    return yaml.safe_dump(snapshot, sort_keys=False)


def _claim_for_resume(out: Path, populate: Callable[[Path], None]) -> tuple[Path, None, RunLock, bool]:
    if not os.path.lexists(out):
        raise UserError(f"--resume: {out} does not exist: there is no run to resume")
    ours = (out / LOCK_FILE).is_file()
    if not out.is_dir() or not (ours or (out / "config.yaml").is_file()):
        raise UserError(f"--resume: {out} is not a run directory")
    status = run_state(out)
    if status == "finished":
        raise UserError(f"--resume: {out} already finished; rerun its config.yaml to replay it")
    if status == "damaged":
        raise UserError(_damaged(out))
    if status == "empty" and not ours:
        raise UserError(f"--resume: {out} holds no unfinished run to resume (no state.pt)")
    lock = _take(out, create=True)  # a run directory of an earlier version has no lock file yet
    if run_state(out) != status:  # its owner changed it before we held the lock: look again
        lock.release()
        return _claim_for_resume(out, populate)
    if status == "unfinished":
        _remove_temporaries(out)
    else:
        _reset(out, populate)  # killed before its first saved state: start it again, with its own config and seed
    return out, None, lock, status == "unfinished"


def _remove_temporaries(directory: Path) -> None:
    """Remove the temporary files of atomic writes that a killed process left in a run directory we now own."""
    for tmp in directory.rglob(".*.tmp"):
        remove_quietly(str(tmp))


def _take(directory: Path, create: bool = False, record: bool = True) -> RunLock:
    try:
        return RunLock.take(directory, create, record)
    except OSError as err:
        raise UserError(f"{directory}: cannot lock {LOCK_FILE} ({err.strerror or err})") from None


def _damaged(path: Path) -> str:
    return (f"{path} is a damaged run: its summary.json is unreadable or does not say finished; nothing in it is "
            "touched: repair or move it, or choose another --out")


def _inspect(directory: Path) -> tuple[str, Optional[RunLock]]:
    """(what the existing ``directory`` holds, its lock when instill created it): ``gone`` when it vanished."""
    if not os.path.lexists(directory):
        return "gone", None
    if not directory.is_dir():
        raise UserError(f"{directory} exists and is not a directory: choose another --out")
    ours = (directory / LOCK_FILE).is_file()
    if run_state(directory) == "damaged":  # looked at, never locked: it stays byte for byte as it is
        raise UserError(_damaged(directory))
    lock = None
    if ours:
        try:
            lock = _take(directory, record=False)
        except UserError:
            if not os.path.lexists(directory / LOCK_FILE):  # removed by its owner meanwhile
                return "gone", None
            raise
    status = run_state(directory)
    if status == "damaged":
        lock and lock.release()
        raise UserError(_damaged(directory))
    if status == "empty" and not ours:
        if any(os.path.lexists(directory / name) for name in ("seed.txt", "config.yaml", "env.json")):
            raise UserError(f"{directory} was not created by this version of instill (it has no {LOCK_FILE}), so "
                            "it is never overwritten: move it, or choose another --out")
        raise UserError(f"{directory} exists and is not a run directory: choose another --out")
    return status, lock


def _create(directory: Path, populate: Callable[[Path], None]) -> Optional[RunLock]:
    """Build the run directory under a hidden name and rename it into place: its lock, or None when it exists."""
    if os.path.lexists(directory) and not _is_empty_dir(directory):
        return None
    parent = directory.parent
    make_directory(parent, directory)
    _remove_stale_staging(parent)
    staging, lock = None, None
    try:
        staging = Path(tempfile.mkdtemp(dir=parent, prefix=STAGING_PREFIX))
        os.chmod(staging, user_mode(directory=True))
        lock = RunLock.create_new(staging)
        populate(staging)
        fault_point()
        os.rename(staging, directory)  # fails when the directory appeared meanwhile (another launch won)
        lock.directory = directory
        return lock
    except BaseException as err:
        if lock is not None:
            lock.release()
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        if isinstance(err, OSError):
            if err.errno in (errno.EEXIST, errno.ENOTEMPTY):
                return None
            raise write_error(directory, err) from None
        raise


def _is_empty_dir(path: Path) -> bool:
    try:
        return path.is_dir() and not path.is_symlink() and not any(os.scandir(path))
    except OSError:
        return False


def _remove_stale_staging(parent: Path) -> None:
    """Remove hidden directories that launches killed while building them (their lock is free)."""
    try:
        candidates = [p for p in parent.iterdir() if p.name.startswith(STAGING_PREFIX) and p.is_dir()]
    except OSError:
        return
    for staging in candidates:
        try:
            lock = RunLock.try_take(staging)
        except FileNotFoundError:  # killed before it locked, or being built or renamed into place this very moment
            with contextlib.suppress(OSError):  # (renamed: its owner won; not ours to touch either way)
                if _killed_while_locking(staging) or time.time() - staging.stat().st_mtime > 60:
                    shutil.rmtree(staging, ignore_errors=True)  # a live launch locks within a minute
            continue
        except OSError:
            continue
        if lock is not None:
            shutil.rmtree(staging, ignore_errors=True)
            lock.release()


def _killed_while_locking(staging: Path) -> bool:
    """Whether ``staging``'s launch was killed between creating its lock file and naming it (``RunLock.create_new``):
    the new file is free to lock and older than the instant between its creation and its lock."""
    new = staging / f"{LOCK_FILE}.new"
    try:
        if time.time() - new.stat().st_mtime < 2:
            return False
        lock = RunLock.try_take(staging, record=False, file=new.name)
    except OSError:
        return False
    if lock is None:  # its launch is alive and holds it
        return False
    lock.release()
    return True


def _reset(directory: Path, populate: Callable[[Path], None]) -> None:
    """Empty a run directory instill created that holds no saved work (we hold its lock), then populate it."""
    try:
        for entry in os.scandir(directory):
            if entry.name == LOCK_FILE:
                continue
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.remove(entry.path)
        populate(directory)
    except OSError as err:
        raise UserError(f"cannot prepare run directory {directory}: {err.strerror or err}") from None


def _populate(directory: Path, config_yaml: str, seed: int, device: str) -> None:
    """A new run's first files: config.yaml (replays the run), seed.txt, env.json."""
    for name, text in (("config.yaml", config_yaml), ("seed.txt", f"{seed}\n"),
                       ("env.json", json.dumps(environment(device), indent=2) + "\n")):
        with open(directory / name, "w") as f:
            f.write(text)
        fault_point()


def git_commit() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: str) -> dict[str, Any]:
    import importlib.metadata as md

    versions = {}
    for package in ("torch", "torchvision", "numpy", "transformers", "timm", "pydantic", "safetensors"):
        try:
            versions[package] = md.version(package)
        except md.PackageNotFoundError:
            pass
    return {
        "python": platform.python_version(),
        "versions": versions,
        "platform": platform.platform(),
        "host": socket.gethostname(),
        "git_commit": git_commit(),
        "device": device,
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch_threads": torch.get_num_threads(),
        "world_size": dist.world_size(),
        "deterministic": {"algorithms": torch.are_deterministic_algorithms_enabled(),
                          "cudnn_deterministic": torch.backends.cudnn.deterministic,
                          "cudnn_benchmark": torch.backends.cudnn.benchmark,
                          "float32_matmul_precision": torch.get_float32_matmul_precision()},
        "load_average": _load_average(),
        "command": [sys.executable] + sys.argv,
        "outside_code": _outside_code(),
        "start_time": _now(),
        "end_time": None,
    }


def time_left(elapsed_s: float, done: float, total: float) -> str:
    """``~2 min left`` from the rate so far (work done in ``elapsed_s`` seconds), for progress lines that a log
    file keeps as well as a terminal; empty before any work is done or after all of it."""
    if done <= 0 or total <= done or elapsed_s <= 0:
        return ""
    seconds = elapsed_s / done * (total - done)
    shown = (f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min" if seconds < 5400
             else f"{seconds / 3600:.1f} h")
    return f"~{shown} left"


def _load_average() -> Optional[float]:
    """The 1-minute load average at the start (a busy machine explains a slow run), where the system has one."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


# What changes the order of floating-point reductions, so that the same seed and config give other bits: a replay
# that differs in one of these says so before it starts and after it ends (env.json records them all).
REDUCTION_SETTINGS = ("torch_threads", "device", "cuda_device", "world_size", "deterministic", "versions.torch",
                      "versions.numpy", "python")


def reduction_differences(recorded: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``setting: recorded -> now`` for each of REDUCTION_SETTINGS that differs between two env.json records."""
    def value(env: dict[str, Any], key: str) -> Any:
        for part in key.split("."):
            env = env.get(part) if isinstance(env, dict) else None
        return env

    if not recorded or not now:
        return []
    return [f"{key} {value(recorded, key)!r} -> {value(now, key)!r}" for key in REDUCTION_SETTINGS
            if value(recorded, key) != value(now, key) and value(recorded, key) is not None]


def code_change(recorded: dict[str, Any], now: dict[str, Any]) -> Optional[str]:
    """``instill commit A -> B`` when two env.json records name different commits (both recorded), else None: a
    replay that differs under equal settings is then explained by a change of the code."""
    before, after = recorded.get("git_commit"), now.get("git_commit")
    return f"instill commit {before[:7]} -> {after[:7]}" if before and after and before != after else None


def _outside_code() -> dict[str, Any]:
    from .registry import outside_code

    return outside_code()


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class Run:
    """One run directory (or a sub-run inside one). Only rank 0 writes; other ranks get a Run that writes nothing.

    ``resumed`` is true when the directory already held state to continue from. The wall-clock time a run takes
    adds up over the processes that work on it (``elapsed_s`` in env.json, updated whenever state is saved).
    """

    def __init__(self, path: Path, *, replay_of: Optional[Path] = None, resumed: bool = False):
        self.path = Path(path)
        self.replay_of = replay_of
        self.resumed = resumed
        self.writes = dist.is_main()
        self.top: Run = self  # the run directory whose env.json counts the time (itself, or a sub-run's parent)
        self._started = time.perf_counter()
        self._elapsed_before = 0.0  # seconds the processes before this one spent on the run
        self._lock: Optional[RunLock] = None  # held by the process that claimed the directory (rank 0)
        self.sinks: list = []  # optional loggers fed with every metrics row (instill.loggers)
        self._sub_rows: list[dict[str, Any]] = []  # one top-level metrics row per sub-run, in order (``sweep``)
        self._open_sinks: Optional[Callable[[Path], list]] = None

    # --- creation -------------------------------------------------------------------------------------------

    @classmethod
    def create(cls, output_dir: str | Path, config_yaml: str, seed: int, device: str, resume: bool) -> "Run":
        """Claim (see ``claim_run_dir``) and open the run directory, writing config, seed and environment at once.

        The returned run holds the directory's lock until ``close`` (or the end of the process).
        """
        lock: Optional[RunLock] = None

        def claim() -> tuple[Path, Optional[Path], bool]:
            nonlocal lock
            def populate(directory: Path, final: Optional[Path] = None) -> None:
                _populate(directory, config_yaml if final is None else _with_output_dir(config_yaml, final), seed,
                          device)

            path, replay_of, lock, resumed = claim_run_dir(output_dir, resume, populate, config_yaml)
            return path, replay_of, resumed

        path, replay_of, resumed = dist.broadcast(claim)
        run = cls(path, replay_of=replay_of, resumed=resumed)
        run._lock = lock
        if resumed:
            run._elapsed_before = float((read_json(path / "env.json") or {}).get("elapsed_s", 0.0))
        dist.barrier()
        return run

    def close(self) -> None:
        """Release the run directory's lock (another process may then resume or replay it)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def child(self, name: str) -> "Run":
        """A sub-run in ``<run>/<name>/`` (one condition of a sweep), resumable on its own."""
        path = self.path / name
        sub = Run(path, resumed=(path / "state.pt").exists())
        sub.top = self.top
        if sub.writes:
            make_directory(path)
            if not sub.resumed and not is_finished(path):  # rows logged before a kill that came before any state
                for name in ("metrics.jsonl", "metrics.csv"):  # was saved: the sub-run starts over, so do they
                    remove_quietly(path / name)
        if self._open_sinks is not None:
            sub.attach_sinks(self._open_sinks)
        return sub

    def attach_sinks(self, open_sinks: Optional[Callable[[Path], list]]) -> None:
        """Feed every metrics row to the loggers ``open_sinks(path)`` opens (here and in each sub-run)."""
        self._open_sinks = open_sinks
        if open_sinks is not None and self.writes:
            self.sinks = open_sinks(self.path)

    def close_sinks(self) -> None:
        for sink in self.sinks:
            sink.close()
        self.sinks = []

    def sweep(self, jobs: list[tuple[str, Callable[["Run"], dict[str, Any]]]]) -> list[dict[str, Any]]:
        """Run each ``(name, job)`` in its own sub-run and return their summaries, in order.

        A sub-run that already finished (a resumed sweep) is not run again: its summary is read back.
        """
        rows, started, ran = [], time.perf_counter(), 0
        for index, (name, job) in enumerate(jobs):
            sub = self.child(name)
            done = read_json(sub.path / "summary.json") if is_finished(sub.path) else None
            if done is None:
                try:
                    done = {"status": "finished", **job(sub)}
                finally:
                    sub.close_sinks()
                sub.write_json("summary.json", done)
                ran += 1
                left = time_left(time.perf_counter() - started, ran, ran + len(jobs) - index - 1)
                if self.writes and len(jobs) > 1:
                    print(f"[{self.path.name}] {index + 1} of {len(jobs)} sub-runs done"
                          + (f", {left} in this stage" if left else ""), flush=True)
            rows.append({k: v for k, v in done.items() if k != "status"})
            self._log_sub_run(name, rows[-1])
        return rows

    def _log_sub_run(self, name: str, row: dict[str, Any]) -> None:
        """The top-level log of a stage that owns sub-runs: one row per sub-run, rewritten whole (never appended),
        so that a resumed sweep, which reads the finished sub-runs' summaries back, logs each exactly once."""
        flat = {k: v for k, v in row.items() if isinstance(v, (int, float, str)) or v is None}
        self._sub_rows.append({"step": len(self._sub_rows) + 1, "sub_run": name, **flat})
        self.write_metrics(self._sub_rows)

    # --- metrics ----------------------------------------------------------------------------------------------

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    def metrics(self) -> list[dict[str, Any]]:
        return read_metrics(self.path)

    def log_metrics(self, row: dict[str, Any]) -> None:
        """Append one evaluation's figures to metrics.jsonl and rewrite metrics.csv with the same rows."""
        if not self.writes:
            return
        try:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(row, default=json_default) + "\n")
        except OSError as err:
            raise write_error(self.metrics_path, err) from None
        fault_point()
        self._write_csv(self.metrics())
        for sink in self.sinks:
            sink.log(row)

    def write_metrics(self, rows: list[dict[str, Any]]) -> None:
        """Replace metrics.jsonl and metrics.csv with ``rows``: for figures derived from sub-runs, which a resumed
        sweep derives again (appending them would log the rows before the interruption twice)."""
        if self.writes:
            atomic_write_text(self.metrics_path, "".join(json.dumps(r, default=json_default) + "\n" for r in rows))
            self._write_csv(rows)

    def truncate_metrics(self, after_step: int) -> None:
        """Drop rows logged after the saved state (they will be logged again when the run resumes)."""
        if self.writes and self.metrics_path.exists():
            rows = [r for r in self.metrics() if r.get("step", 0) <= after_step]
            atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in rows))
            self._write_csv(rows)

    def _write_csv(self, rows: list[dict[str, Any]]) -> None:
        atomic_write_csv(self.path / "metrics.csv", rows)

    # --- files ------------------------------------------------------------------------------------------------

    def write_json(self, name: str, obj: Any) -> None:
        if self.writes:
            atomic_write_json(self.path / name, obj)

    def save_state(self, state: dict[str, Any]) -> None:
        if self.writes:
            atomic_save(self.path / "state.pt", lambda tmp: torch.save(state, tmp))
            self.top.record_elapsed()  # a killed process loses no more of the count than of its training

    def elapsed_s(self) -> float:
        """Wall-clock seconds spent on this run so far, over every process that worked on it (resumes add up)."""
        return self._elapsed_before + time.perf_counter() - self._started

    def record_elapsed(self, quiet: bool = False) -> None:
        """Store ``elapsed_s`` in env.json, where a resumed run reads it back (nothing when the directory is gone).

        ``quiet``: a failed write is ignored (the run is already stopping for another reason, reported instead).
        """
        env = read_json(self.path / "env.json") if self.writes else None
        if env is not None:
            env["elapsed_s"] = round(self.elapsed_s(), 3)
            try:
                atomic_write_json(self.path / "env.json", env)
            except UserError:
                if not quiet:
                    raise

    def load_state(self) -> Optional[dict[str, Any]]:
        path = self.path / "state.pt"
        if not os.path.lexists(path):
            return None
        if not path.is_file():  # a FIFO would block the reader forever
            raise UserError(f"{path}: saved state is not a regular file")
        try:  # tensors, numbers, strings and NumPy's RNG arrays only: a planted file cannot run code
            with torch.serialization.safe_globals(STATE_GLOBALS):
                return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # a truncated or foreign file: the user must decide, we must not guess
            raise UserError(f"{path}: cannot read saved state ({err.__class__.__name__}); it may be corrupt") from None

    def save_weights(self, name: str, model: torch.nn.Module, metadata: Optional[dict[str, str]] = None) -> None:
        """``<name>.safetensors`` (tied weights are stored once, as safetensors' save_model does)."""
        if not self.writes:
            return
        from safetensors.torch import save_model

        target = dist.unwrap(model)
        atomic_save_safetensors(self.path / f"{name}.safetensors",
                                lambda tmp: save_model(target, tmp, metadata=metadata))

    def finish(self, summary: dict[str, Any]) -> None:
        """Write summary.json (marking the run finished), stamp the end time, and check a replay."""
        if not self.writes:
            return
        if self.replay_of is not None:
            recorded, now = self._env_records()
            differences = reduction_differences(recorded, now)
            replay = {**compare_runs(self.replay_of, self.path), "settings_differ": differences}
            code = replay["code_changed"] = code_change(recorded, now) if not replay["matches"] else None
            self.write_json("replay.json", replay)
            verdict = "matches the original exactly" if replay["matches"] else "DIFFERS from the original"
            why = (f"; not expected to match bit for bit: recorded settings differ: {'; '.join(differences)}"
                   if differences else f"; the code changed since the original ({code})" if code else "")
            print(f"replay of {self.replay_of}: {verdict} (max_abs_diff={replay['max_abs_diff']}){why}")
        env = read_json(self.path / "env.json")
        if env is not None:
            env["end_time"], env["elapsed_s"] = _now(), round(self.elapsed_s(), 3)
            atomic_write_json(self.path / "env.json", env)
        self.write_json("summary.json", {"status": "finished", **summary})
        self.close_sinks()

    def replay_differences(self) -> list[str]:
        """On a replay: the recorded settings that change float reduction order (REDUCTION_SETTINGS) and differ
        between the original's env.json and this run's; empty when they all agree (or this is no replay)."""
        return reduction_differences(*self._env_records()) if self.replay_of is not None else []

    def _env_records(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """The original's env.json and this replay's ({} for one that is missing or unreadable)."""
        return read_json(self.replay_of / "env.json") or {}, read_json(self.path / "env.json") or {}

    def discard_if_empty(self) -> bool:
        """Remove the directory this process claimed when it holds no saved work yet (a failed start); True if so."""
        if self.writes and self._lock is not None and not self.resumed and run_state(self.path) == "empty":
            shutil.rmtree(self.path, ignore_errors=True)
            return True
        return False


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of ``<path>/metrics.jsonl``: none when it is missing or unreadable, only JSON objects otherwise."""
    try:
        text = read_regular_bytes(Path(path) / "metrics.jsonl").decode(errors="replace")
    except OSError:  # missing, or not a readable regular file (a FIFO would block forever)
        return []
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:  # a line cut off by a kill: the rows before it still count
            break
        if isinstance(row, dict):
            rows.append(row)
    return rows


def _metric_files(root: Path) -> Iterator[Path]:
    for file in sorted(root.rglob("metrics.jsonl")):
        yield file.parent.relative_to(root)


def compare_runs(original: Path, replay: Path) -> dict[str, Any]:
    """Do the two runs' metrics (every metrics.jsonl, sub-runs included) agree? Timing columns are ignored."""
    max_diff, matches, problems = 0.0, True, []
    for rel in _metric_files(original):
        a, b = read_metrics(original / rel), read_metrics(replay / rel)
        if len(a) != len(b):
            matches = False
            problems.append(f"{rel or '.'}: {len(a)} rows against {len(b)}")
        for row_a, row_b in zip(a, b):
            for key in set(row_a) | set(row_b):
                if key.startswith(TIMING_PREFIX):
                    continue
                va, vb = row_a.get(key), row_b.get(key)
                if isinstance(va, (int, float)) and isinstance(vb, (int, float)):
                    diff = abs(va - vb) if not (math.isnan(va) and math.isnan(vb)) else 0.0
                    max_diff = max(max_diff, diff)
                    matches &= diff == 0
                elif va != vb:
                    matches = False
                    problems.append(f"{rel or '.'}: {key}: {va!r} against {vb!r}")
    return {"matches": matches, "max_abs_diff": max_diff, "original": str(original), "problems": problems[:20]}
