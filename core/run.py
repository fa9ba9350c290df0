"""Run directories: seed, config snapshot, environment, metrics log, weights, resume state, replay check.

The contract (docs/design.md): ``config.yaml`` (resolved, with ``reproduce: true`` and the seed filled in, so
rerunning it replays the run), ``seed.txt``, ``env.json``, ``metrics.jsonl`` + ``metrics.csv``, ``summary.json``,
weights as safetensors, ``state.pt``, plots. A run is finished once ``summary.json`` says so; a finished run is never
overwritten: running its very config again writes ``<dir>-replay-<k>`` and compares the metrics, and any other run
aimed at it writes ``<dir>-<k>``. Every file is written atomically (temporary file, then rename), so an interrupted
run leaves either the old file or the new one.
"""

from __future__ import annotations

import csv
import datetime as _dt
import hashlib
import io
import json
import math
import os
import platform
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch

from . import dist
from .errors import UserError

TIMING_PREFIX = "time_"  # metrics whose names start with this are wall-clock figures, not compared on replay


# ---------------------------------------------------------------------------------------------------------------
# Seeds


def draw_seed() -> int:
    """A fresh seed from the operating system's entropy (63 bits, so it fits every RNG we seed)."""
    return int.from_bytes(os.urandom(8), "little") >> 1


def derive_seed(seed: int, *labels: Any) -> int:
    """A 63-bit seed for one purpose of a run (a sub-run's initialisation, its batches, ...): stable across runs."""
    digest = hashlib.sha256(repr((seed, *labels)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seed python ``random``, NumPy and torch (all devices); optionally ask for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------------------------
# Atomic files


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _remove_quietly(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default) + "\n")


def atomic_save(path: str | Path, save_fn) -> None:
    """Call ``save_fn(tmp_path)`` and move the result into place: for writers that want a file name."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_fn(tmp)
        os.replace(tmp, path)
    except BaseException:
        _remove_quietly(tmp)
        raise


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _json_default(obj):
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, torch.Tensor) and obj.numel() == 1:
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def read_json(path: str | Path) -> Optional[dict]:
    """The JSON object in ``path``, or None when the file is missing or unreadable."""
    try:
        with open(path) as f:
            value = json.load(f)
        return value if isinstance(value, dict) else None
    except (OSError, ValueError):
        return None


# ---------------------------------------------------------------------------------------------------------------
# Run directory


def is_finished(path: str | Path) -> bool:
    summary = read_json(Path(path) / "summary.json")
    return bool(summary) and summary.get("status") == "finished"


def has_state(path: str | Path) -> bool:
    """Saved training state in the run directory or in one of its sub-runs."""
    path = Path(path)
    return (path / "state.pt").is_file() or any(path.glob("*/state.pt"))


def choose_run_dir(output_dir: str | Path, resume: bool, config_yaml: Optional[str] = None
                   ) -> tuple[Path, Optional[Path]]:
    """(directory to write, original run being replayed or None) for a new run or a resumed one.

    Where ``output_dir`` holds a finished run, a rerun of that very run (``config_yaml``, seed included, is the
    recorded ``config.yaml``) is a replay, written to ``<dir>-replay-<k>``; any other run is a new one, written to
    ``<dir>-<k>`` (k = 2, 3, ...) and compared with nothing.
    """
    out = Path(output_dir)
    if resume:
        if not has_state(out):
            raise UserError(f"--resume: {out} holds no unfinished run to resume (no state.pt)")
        if is_finished(out):
            raise UserError(f"--resume: {out} already finished; rerun its config.yaml to replay it")
        return out, None
    if not out.exists() or _abandoned(out):
        return out, None
    if is_finished(out):
        replay = config_yaml is None or is_replay_of(out, config_yaml)
        k = 1 if replay else 2
        pattern = f"{out}-replay-{{}}" if replay else f"{out}-{{}}"
        while Path(pattern.format(k)).exists() and not _abandoned(Path(pattern.format(k))):
            k += 1
        return Path(pattern.format(k)), out if replay else None
    if has_state(out):
        raise UserError(f"{out} holds an unfinished run: continue it with --resume, or choose another --out")
    raise UserError(f"{out} exists and is not a run directory: choose another --out")


def is_replay_of(run_dir: Path, config_yaml: str) -> bool:
    """Whether ``config_yaml`` (a resolved snapshot, seed included) asks for the run recorded in ``run_dir``: every
    recorded key has the same value (keys the recorded snapshot lacks, options added since, are not compared)."""
    import yaml

    try:
        recorded = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return False
    return _holds(yaml.safe_load(config_yaml), recorded)


def _holds(new: Any, recorded: Any) -> bool:
    if isinstance(recorded, dict):
        return isinstance(new, dict) and all(k in new and _holds(new[k], v) for k, v in recorded.items())
    return new == recorded


def _abandoned(path: Path) -> bool:
    """A run directory that holds nothing worth keeping: created, but stopped before its first saved state."""
    return (path / "seed.txt").is_file() and not has_state(path) and not is_finished(path)


def _with_output_dir(config_yaml: str, path: Path) -> str:
    import yaml

    snapshot = yaml.safe_load(config_yaml)
    if not isinstance(snapshot, dict) or "output_dir" not in snapshot:
        return config_yaml
    snapshot["output_dir"] = str(path)
    return yaml.safe_dump(snapshot, sort_keys=False)


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
        "command": [sys.executable] + sys.argv,
        "outside_code": _outside_code(),
        "start_time": _now(),
        "end_time": None,
    }


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
        self.sinks: list = []  # optional loggers fed with every metrics row (instill.loggers)
        self._open_sinks: Optional[Callable[[Path], list]] = None
        self._started = time.perf_counter()
        self._elapsed_before = 0.0  # seconds the processes before this one spent on the run

    # --- creation -------------------------------------------------------------------------------------------

    @classmethod
    def create(cls, output_dir: str | Path, config_yaml: str, seed: int, device: str, resume: bool) -> "Run":
        """Create (or reopen, with ``resume``) the run directory, writing config, seed and environment at once."""
        path, replay_of = dist.broadcast(lambda: choose_run_dir(output_dir, resume, config_yaml))
        run = cls(path, replay_of=replay_of, resumed=resume)
        if replay_of is None and not resume and path != Path(output_dir):  # a new run beside a finished one
            config_yaml = _with_output_dir(config_yaml, path)  # its snapshot replays into its own directory
        if run.writes and not resume:
            run._create_files(config_yaml, seed, device)
        if resume:
            run._elapsed_before = float((read_json(path / "env.json") or {}).get("elapsed_s", 0.0))
        dist.barrier()
        return run

    def _create_files(self, config_yaml: str, seed: int, device: str) -> None:
        # Build everything in a hidden sibling, then rename: the directory appears complete or not at all.
        self.path.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=self.path.parent, prefix=f".{self.path.name}.tmp-"))
        (staging / "config.yaml").write_text(config_yaml)
        (staging / "seed.txt").write_text(f"{seed}\n")
        (staging / "env.json").write_text(json.dumps(environment(device), indent=2) + "\n")
        if self.path.exists():  # an abandoned directory (see _abandoned): nothing in it to keep
            shutil.rmtree(self.path)
        os.rename(staging, self.path)

    def child(self, name: str) -> "Run":
        """A sub-run in ``<run>/<name>/`` (one condition of a sweep), resumable on its own."""
        path = self.path / name
        sub = Run(path, resumed=(path / "state.pt").exists())
        sub.top = self.top
        if sub.writes:
            path.mkdir(parents=True, exist_ok=True)
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
        rows = []
        for name, job in jobs:
            sub = self.child(name)
            done = read_json(sub.path / "summary.json") if is_finished(sub.path) else None
            if done is None:
                try:
                    done = {"status": "finished", **job(sub)}
                finally:
                    sub.close_sinks()
                sub.write_json("summary.json", done)
            rows.append({k: v for k, v in done.items() if k != "status"})
        return rows

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
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(row, default=_json_default) + "\n")
        self._write_csv(self.metrics())
        for sink in self.sinks:
            sink.log(row)

    def truncate_metrics(self, after_step: int) -> None:
        """Drop rows logged after the saved state (they will be logged again when the run resumes)."""
        if self.writes and self.metrics_path.exists():
            rows = [r for r in self.metrics() if r.get("step", 0) <= after_step]
            atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in rows))
            self._write_csv(rows)

    def _write_csv(self, rows: list[dict[str, Any]]) -> None:
        columns: list[str] = []
        for row in rows:
            columns += [k for k in row if k not in columns]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(self.path / "metrics.csv", buffer.getvalue())

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

    def record_elapsed(self) -> None:
        """Store ``elapsed_s`` in env.json, where a resumed run reads it back (nothing when the directory is gone)."""
        env = read_json(self.path / "env.json") if self.writes else None
        if env is not None:
            env["elapsed_s"] = round(self.elapsed_s(), 3)
            atomic_write_json(self.path / "env.json", env)

    def load_state(self) -> Optional[dict[str, Any]]:
        path = self.path / "state.pt"
        if not path.exists():
            return None
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as err:  # a truncated or foreign file: the user must decide, we must not guess
            raise UserError(f"{path}: cannot read saved state ({err.__class__.__name__}); it may be corrupt") from None

    def save_weights(self, name: str, model: torch.nn.Module, metadata: Optional[dict[str, str]] = None) -> None:
        """``<name>.safetensors`` (tied weights are stored once, as safetensors' save_model does)."""
        if not self.writes:
            return
        from safetensors.torch import save_model

        target = dist.unwrap(model)
        atomic_save(self.path / f"{name}.safetensors", lambda tmp: save_model(target, tmp, metadata=metadata))

    def finish(self, summary: dict[str, Any]) -> None:
        """Write summary.json (marking the run finished), stamp the end time, and check a replay."""
        if not self.writes:
            return
        if self.replay_of is not None:
            replay = compare_runs(self.replay_of, self.path)
            self.write_json("replay.json", replay)
            verdict = "matches the original exactly" if replay["matches"] else "DIFFERS from the original"
            print(f"replay of {self.replay_of}: {verdict} (max_abs_diff={replay['max_abs_diff']})")
        env = read_json(self.path / "env.json")
        if env is not None:
            env["end_time"], env["elapsed_s"] = _now(), round(self.elapsed_s(), 3)
            atomic_write_json(self.path / "env.json", env)
        self.write_json("summary.json", {"status": "finished", **summary})
        self.close_sinks()

    def discard_if_empty(self) -> None:
        """Remove a directory this process created that holds no saved state yet (a failed start)."""
        if self.writes and not self.resumed and self.path.exists() and not has_state(self.path) \
                and not is_finished(self.path):
            shutil.rmtree(self.path, ignore_errors=True)


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of ``<path>/metrics.jsonl``: none when it is missing or unreadable, only JSON objects otherwise."""
    try:
        text = (Path(path) / "metrics.jsonl").read_bytes().decode(errors="replace")
    except OSError:  # missing, or not a readable file
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
