"""Sweeps: one stage config run at every point of a grid, in parallel here or as a SLURM job array.

    python -m instill.sweep SWEEP.yaml [--out DIR] [--executor auto|local|slurm] [--workers N] [--validate] [--list]
    python -m instill.sweep CONFIG.yaml --grid KEY=V1,V2 [--grid KEY=...] [--set KEY=VALUE] [the same options]

The second form is the sweep file ``{sweep: {config: CONFIG.yaml, grid: {KEY: [V1, V2], ...}, set: {...}}}`` written
on the command line (as Hydra's ``-m``): the same points, files, resume and report; its directory is
``checkpoints/<config stem>-sweep`` unless ``--out`` says otherwise. Values are YAML, comma-separated:
``--grid reproducibility.random_seed=1,2,3 --grid transfer.conditions=[subnet],[random_init]``.

A sweep file holds one ``sweep:`` section::

    sweep:
      config: configs/fcn.yaml           # the stage config every point runs (relative to the working directory)
      stage: transfer                    # its stage (default: the config's own ``stage:``)
      grid:                              # every combination of these values, by dotted config key
        reproducibility.random_seed: [1, 2, 3]
        train.optimizer.lr: [0.001, 0.01]
      points:                            # explicit points, each crossed with the grid (omit for the grid alone)
        - {transfer.batch_norm: inherit}
        - {transfer.batch_norm: reset}
      set: {train.epochs: 5}             # the same values at every point
      upstream: shared                   # per_point: each point trains its own upstream runs (base, mask, guide)
      executor: {kind: auto, workers: null, threads: 1, slurm: {partition: gpu, time_min: 60, gpus_per_node: 1}}

An explicit point may also name its own ``config`` and ``stage`` (and ``name``): ``make reproduce`` is one sweep
over many presets. Each point is a normal run of its stage in ``<sweep dir>/<point name>/`` (replayable, resumable,
listed by ``python -m instill.report``). The sweep directory also holds ``sweep.json`` (the grid and the points),
``points/<name>.json`` (each point's state: finished, failed with its error, interrupted), ``status.json`` and
``logs/<name>.log`` (the point's output). Every point's config is validated before anything is written or submitted.
Running the same sweep again skips finished points, resumes interrupted ones from their saved state and reruns
failed ones; a failed point never stops the others. Explicit points may be added to an existing sweep directory;
another grid, ``set`` or ``upstream`` is another sweep (``--out``). A SLURM sweep waits for its job array; if this
process is stopped while jobs still run, a rerun adopts them: each point's SLURM job id is recorded in its state
(``points/<name>.json``, ``submitted``) when it is submitted, and a point whose job is still queued or running
(``squeue``) is waited for, never submitted again.
"""

from __future__ import annotations

if __name__ == "__main__":  # python -m instill.sweep: nothing below runs in this copy
    from instill.errors import run_module

    run_module("instill.sweep")

import argparse
import contextlib
import hashlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .config import read_yaml
from .errors import UserError, exit_code_of
from .registry import describe_error, import_builtins
from .files import atomic_write_json, first_missing, make_directory, read_json, remove_quietly, write_error
from .run import RunLock, has_state, is_finished, lock_owner, time_left

SEED_KEY = "reproducibility.random_seed"
POINT_SPECIAL_KEYS = ("name", "config", "stage")  # keys of an explicit point that are not config keys
# Imported by the sweep process before it forks its local workers, so that no point pays for them, besides the
# shipped stages and registry entries (registry.import_builtins): torch's compiler stack (deterministic algorithms
# import it on first use) and the plots.
PRELOAD = ["torch._inductor", "matplotlib.pyplot"]


# ---------------------------------------------------------------------------------------------------------------
# The sweep file


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SlurmSettings(_Strict):
    partition: Optional[str] = Field(None, description="SLURM partition (default: the cluster's default)")
    time_min: int = Field(60, ge=1, description="time limit of one point's job, minutes")
    cpus_per_task: int = Field(1, ge=1)
    gpus_per_node: int = Field(0, ge=0, description="GPUs per point's job")
    mem_gb: Optional[float] = Field(None, gt=0, description="memory per point's job (default: the cluster's)")
    array_parallelism: int = Field(256, ge=1, description="at most this many points' jobs run at once")
    processes_per_point: Optional[int] = Field(
        None, ge=1, description="torchrun processes per point (default: gpus_per_node when above 1, else one plain "
                                "process)")
    additional: dict[str, Any] = Field(default_factory=dict, description="further sbatch options, e.g. {account: x}")


class ExecutorSettings(_Strict):
    kind: Literal["auto", "local", "slurm"] = Field("auto", description="auto: slurm where a SLURM controller answers")
    workers: Optional[int] = Field(None, ge=1, description="local: parallel points (default: the CPU cores)")
    threads: int = Field(1, ge=1, description="torch threads per point (local workers and SLURM jobs)")
    slurm: SlurmSettings = Field(default_factory=SlurmSettings)


class SweepSpec(_Strict):
    config: Optional[str] = Field(None, description="the stage config every point runs")
    stage: Optional[str] = Field(None, description="the stage (default: the config's stage: key)")
    grid: dict[str, list[Any]] = Field(default_factory=dict, description="dotted key -> values; every combination")
    points: list[dict[str, Any]] = Field(default_factory=list, description="explicit points, crossed with the grid")
    set: dict[str, Any] = Field(default_factory=dict, description="dotted key -> value at every point")
    output_dir: Optional[str] = Field(None, description="the sweep directory (default: checkpoints/<file stem>)")
    upstream: Literal["shared", "per_point"] = Field(
        "shared", description="shared: points reuse the upstream runs their configs name; per_point: each point "
                              "trains its own inside the sweep directory, seeded from the point's seed")
    executor: ExecutorSettings = Field(default_factory=ExecutorSettings)

    @field_validator("stage")
    @classmethod
    def _known_stage(cls, name: Optional[str]) -> Optional[str]:
        from .stages.runner import STAGES

        return name if name is None else STAGES.known(name)

    @field_validator("grid")
    @classmethod
    def _values_per_key(cls, grid: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in grid.items():
            if not values:
                raise ValueError(f"grid key {key!r} has no values (an empty grid has no points)")
        return grid


class SweepFile(_Strict):
    sweep: SweepSpec


# ---------------------------------------------------------------------------------------------------------------
# Points


def expand_points(spec: SweepSpec, source: str) -> list[dict[str, Any]]:
    """The sweep's points: the grid's combinations crossed with the explicit points, each with a unique name.

    Returns:
        ``[{"name", "config", "stage", "values"}]`` in a stable order (values: dotted key -> value).
    Raises:
        UserError: no points at all, a point without a config, a duplicate point name.
    """
    if not spec.grid and not spec.points:
        raise UserError(f"{source}: sweep: the grid is empty and there are no points: nothing to run")
    keys = list(spec.grid)
    combos = [dict(zip(keys, values)) for values in itertools.product(*(spec.grid[k] for k in keys))]
    points, names = [], set()
    for explicit in spec.points or [{}]:
        for combo in combos or [{}]:
            own = {k: v for k, v in explicit.items() if k not in POINT_SPECIAL_KEYS}
            values = {**spec.set, **combo, **own}
            config = explicit.get("config", spec.config)
            if config is None:
                raise UserError(f"{source}: sweep: no config: name the stage config in sweep.config or in every point")
            index = len(points)
            name = explicit.get("name")
            name = _point_name(index, {**combo, **own}) if name is None else \
                f"{name}-{_point_name(None, combo)}" if combo else str(name)
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._=+,-]*", name) or name in names:
                raise UserError(f"{source}: sweep: point name {name!r} is " +
                                ("used twice" if name in names else "not a plain file name"))
            names.add(name)
            points.append({"name": name, "config": str(config), "stage": explicit.get("stage", spec.stage),
                           "values": values})
    _refuse_identical(points, source)
    return points


def _refuse_identical(points: list[dict[str, Any]], source: str) -> None:
    """Two points with the same config, stage and values are one run done twice: a report would count its seed
    twice (a mean over n = 2 of one number, std 0)."""
    seen: dict[str, str] = {}
    for point in points:
        key = json.dumps([point["config"], point["stage"], point["values"]], sort_keys=True, default=str)
        if key in seen:
            raise UserError(f"{source}: sweep: points {seen[key]} and {point['name']} are identical (same config, "
                            "stage and values): remove the duplicate")
        seen[key] = point["name"]


def _point_name(index: Optional[int], values: dict[str, Any]) -> str:
    """``003-lr=0.01-random_seed=2``: readable, unique through the index, safe as a directory name."""
    parts = [] if index is None else [f"{index:03d}"]
    for key, value in values.items():
        text = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
        parts.append(re.sub(r"[^A-Za-z0-9._=+,-]", "_", f"{key.rsplit('.', 1)[-1]}={text}")[:40])
    return "-".join(parts) or "point"


def load_sweep(path: str | Path) -> SweepSpec:
    """The validated ``sweep:`` section of a sweep file.

    Raises:
        UserError: unreadable YAML, no ``sweep:`` section, an unknown or mistyped sweep option.
    """
    raw = read_yaml(path)
    try:
        return SweepFile.model_validate(raw).sweep
    except ValidationError as err:
        raise UserError(f"{path}: {describe_error(err, SweepFile)}") from None


def point_config(point: dict[str, Any], out: Path, source: str):
    """The validated stage config of one point, writing into ``out``.

    Raises:
        UserError: the config's own checks fail at this point (unknown key, nearest listed; wrong type; ...).
    """
    from .config import read_yaml as read
    from .stages import load_stage_config

    try:
        stage = point["stage"] or read(point["config"]).get("stage")
        if stage is None:
            raise UserError(f"{point['config']} declares no stage: set sweep.stage")
        return load_stage_config(point["config"], stage, out=str(out), values=point["values"])
    except UserError as err:
        raise UserError(f"{source}: point {point['name']}: {err}") from None


def fingerprint(spec: SweepSpec) -> str:
    """What makes a sweep directory this sweep's: the grid, the values set everywhere and the upstream choice.
    Explicit points may be added to a sweep later (``make reproduce`` of more claims); its grid cannot change."""
    text = json.dumps({"grid": spec.grid, "set": spec.set, "upstream": spec.upstream}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------------
# Checking and recording a sweep (nothing is written before every point is known to be valid)


class Sweep:
    """A validated sweep: its directory, points, executor choice."""

    def __init__(self, source: str, spec: SweepSpec, out: Path, points: list[dict[str, Any]], executor: str,
                 recorded: list[dict[str, Any]] = ()):
        self.source, self.spec, self.path, self.points, self.executor = source, spec, out, points, executor
        self.recorded = list(recorded)  # points an earlier run of this sweep recorded that this one does not name

    @property
    def record(self) -> dict[str, Any]:
        spec = self.spec
        names = {p["name"] for p in self.points}
        return {"source": self.source, "config": spec.config, "stage": spec.stage, "grid": spec.grid,
                "explicit_points": spec.points, "set": spec.set, "upstream": spec.upstream,
                "fingerprint": fingerprint(spec),
                "points": [p for p in self.recorded if p["name"] not in names] + self.points}


def prepare(path: str | Path, out: Optional[str] = None, executor: Optional[str] = None,
            workers: Optional[int] = None, grid: list[str] = (), values: list[str] = (),
            stage: Optional[str] = None) -> Sweep:
    """Validate a sweep completely: every point's config, the executor, an existing sweep directory.

    Args:
        path: a sweep file, or (with ``grid``) the stage config every point runs.
        grid, values: ``--grid KEY=V1,V2`` and ``--set KEY=VALUE`` items: with a stage config, they are its
            sweep's grid and ``set``; with a sweep file, they add to (and replace keys of) the file's.
        stage: the stage config's stage (default: its ``stage:`` key, or the section only that stage has).

    Raises:
        UserError: anything wrong; nothing has been written.
    """
    is_sweep_file = "sweep" in read_yaml(path)
    if not is_sweep_file and not grid:
        raise UserError(f"{path} has no sweep: section; to sweep a stage config give its grid: --grid KEY=V1,V2")
    spec = load_sweep(path) if is_sweep_file else SweepSpec(config=str(path), stage=stage or _stage_of(path))
    if is_sweep_file and stage:
        spec.stage = stage
    spec.grid.update(_command_line_items(grid, "--grid", as_list=True))
    spec.set.update(_command_line_items(values, "--set", as_list=False))
    if workers is not None:
        spec.executor.workers = workers
    default = Path("checkpoints") / (Path(path).stem if is_sweep_file else f"{Path(path).stem}-sweep")
    return prepare_spec(spec, str(path), Path(out or spec.output_dir or default), executor)


def _stage_of(config: str | Path) -> str:
    from .stages.runner import stage_of

    found = stage_of(read_yaml(config))
    if found is None:
        raise UserError(f"{config}: cannot tell its stage (no stage: key, no section only one stage has): give --stage")
    return found


def _command_line_items(items: list[str], option: str, as_list: bool) -> dict[str, Any]:
    """``KEY=VALUE`` items as typed values; with ``as_list`` each value is a comma-separated YAML list
    (``1,2,3``; ``[a],[b, c]``: two lists)."""
    from .config import parse_yaml

    parsed = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip() or not text.strip():
            raise UserError(f"{option} {item!r}: expected KEY=" + ("V1,V2,..." if as_list else "VALUE"))
        try:
            value = parse_yaml(f"[{text}]" if as_list else text)
        except Exception:  # yaml's errors: one line naming the item
            raise UserError(f"{option} {item!r}: the value is not valid YAML") from None
        parsed[key.strip()] = value
    return parsed


def prepare_spec(spec: SweepSpec, source: str, sweep_dir: Path, executor: Optional[str] = None) -> Sweep:
    """``prepare`` for a sweep built in code (``make reproduce``); ``source`` names it in errors.

    Raises:
        UserError: anything wrong; nothing has been written.
    """
    points = expand_points(spec, source)
    for point in points:
        point_config(point, sweep_dir / point["name"], source)
    kind = choose_executor(executor or spec.executor.kind, source)
    old = read_json(sweep_dir / "sweep.json")
    if sweep_dir.exists() and old is None and not all(_own_debris(p) for p in sweep_dir.iterdir()):
        raise UserError(f"{source}: {sweep_dir} exists and is not a sweep directory (no sweep.json): choose "
                        "another --out")
    recorded = []
    if old is not None:
        if old.get("fingerprint") != fingerprint(spec):
            raise UserError(f"{source}: {sweep_dir} holds a sweep with a different grid, set or upstream "
                            f"({old.get('source')}): choose another --out, or rerun that sweep")
        recorded = [p for p in old.get("points", []) if isinstance(p, dict) and "name" in p]
        mine = {p["name"]: p for p in points}
        for point in recorded:
            if point["name"] in mine and mine[point["name"]] != point:
                raise UserError(f"{source}: {sweep_dir}: point {point['name']} was recorded with other values or "
                                "another config: choose another --out")
    return Sweep(source, spec, sweep_dir, points, kind, recorded)


def choose_executor(kind: str, source: str) -> str:
    """``local`` or ``slurm``; ``auto`` is slurm where a SLURM controller answers.

    Raises:
        UserError: slurm asked for where sbatch is missing or no controller answers.
    """
    if kind not in ("auto", "local", "slurm"):
        raise UserError(f"{source}: executor {kind!r}: expected auto, local or slurm")
    if kind == "local":
        return kind
    problem = slurm_problem()
    if kind == "auto":
        return "local" if problem else "slurm"
    if problem:
        raise UserError(f"{source}: executor slurm: {problem}; use local or auto")
    return kind


def slurm_problem() -> Optional[str]:
    """Why no job could be submitted here, or None. ``sbatch`` on the PATH is not enough: a laptop with the client
    installed and no controller running would fail only at submission, after the sweep directory exists."""
    if shutil.which("sbatch") is None:
        return "sbatch is not on the PATH (no SLURM here)"
    try:
        answered = subprocess.run(["scontrol", "ping"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        answered = False
    return None if answered else "the SLURM controller does not answer (scontrol ping)"


# ---------------------------------------------------------------------------------------------------------------
# One point (in a local worker, a SLURM job, or under torchrun)


def point_state(sweep_dir: Path, name: str) -> str:
    """finished, failed (its last attempt; a rerun resumes any state it saved), interrupted (saved state to
    resume), or pending."""
    run_dir = sweep_dir / name
    if is_finished(run_dir):
        return "finished"
    recorded = read_json(sweep_dir / "points" / f"{name}.json") or {}
    if recorded.get("state") in ("failed", "submitted"):  # submitted: to SLURM, whose job may still be queued
        return recorded["state"]
    return "interrupted" if has_state(run_dir) else "pending"


def run_point(sweep_dir: str | Path, name: str, threads: int = 1, processes: int = 1) -> dict[str, Any]:
    """Run (or resume) one point of a recorded sweep; its outcome also goes to ``points/<name>.json``.

    Never raises for the point's own failure: the outcome says ``failed`` with the error, so the others go on.

    Args:
        sweep_dir: the sweep directory (holding sweep.json).
        name: the point's name.
        threads: torch threads for this point.
        processes: above 1, the point runs under ``torchrun`` with this many processes (one per GPU).
    Returns:
        ``{"name", "state", "error", "duration_s", "host", "job_id"}``.
    """
    sweep_dir = Path(sweep_dir)
    started = time.time()
    outcome: dict[str, Any] = {"name": name, "state": "failed", "error": None, "started_at": round(started, 3),
                               "host": os.uname().nodename, "job_id": os.environ.get("SLURM_JOB_ID")}
    if os.environ.get("SLURM_ARRAY_TASK_ID"):  # the id it was submitted as (array_task), as squeue and sacct know it
        outcome["slurm_job"] = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    elif os.environ.get("SLURM_JOB_ID"):
        outcome["slurm_job"] = os.environ["SLURM_JOB_ID"]
    (sweep_dir / "logs").mkdir(exist_ok=True)
    log_path = sweep_dir / "logs" / f"{name}.log"
    try:
        if processes > 1:
            outcome.update(_run_under_torchrun(sweep_dir, name, processes, log_path))
        else:
            with open(log_path, "a", buffering=1) as log, contextlib.redirect_stdout(log), \
                    contextlib.redirect_stderr(log):  # line-buffered: the log follows the run
                outcome.update(_run_in_process(sweep_dir, name, threads))
    except KeyboardInterrupt:
        outcome.update(state="interrupted", error="interrupted")
    except BaseException as err:  # noqa: BLE001 - one point's failure, whatever it is, must not stop the others
        outcome["error"] = _one_line(err)
        with open(log_path, "a") as log:
            traceback.print_exc(file=log)
    outcome["duration_s"] = round(time.time() - started, 3)
    (sweep_dir / "points").mkdir(exist_ok=True)
    atomic_write_json(sweep_dir / "points" / f"{name}.json", outcome)
    return outcome


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{err.__class__.__name__}: {text[0] if text else ''}".rstrip(": ")


def _find_point(sweep_dir: Path, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    record = read_json(sweep_dir / "sweep.json")
    if record is None:
        raise UserError(f"{sweep_dir}: no readable sweep.json")
    for point in record["points"]:
        if point["name"] == name:
            return record, point
    raise UserError(f"{sweep_dir}: no point named {name!r}")


def _run_in_process(sweep_dir: Path, name: str, threads: int) -> dict[str, Any]:
    import torch

    from . import dist
    from .stages import Interrupted, UpstreamPlacement, execute, upstream_runs_in

    record, point = _find_point(sweep_dir, name)
    run_dir = sweep_dir / name
    if is_finished(run_dir):
        return {"state": "finished", "skipped": True}
    os.environ["OMP_NUM_THREADS"] = str(threads)  # the run keeps this count (stages.runner.free_core_threads)
    torch.set_num_threads(threads)
    cfg = point_config(point, run_dir, record["source"])
    placement = None
    if record["upstream"] == "per_point":
        seed = cfg.reproducibility.random_seed if cfg.reproducibility.reproduce else None
        placement = UpstreamPlacement(sweep_dir / "upstream" / name, seed)
    try:
        with upstream_runs_in(placement):
            execute(cfg, resume=has_state(run_dir))
    except Interrupted:
        return {"state": "interrupted", "error": "interrupted (state saved: rerun the sweep to resume)"}
    finally:
        dist.cleanup()
    return {"state": "finished"}


def _run_under_torchrun(sweep_dir: Path, name: str, processes: int, log_path: Path) -> dict[str, Any]:
    """One point on ``processes`` GPUs of this node: torchrun starts ``python -m instill.sweep --point``."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "-m", "instill.sweep", "--point", str(sweep_dir), name]
    with open(log_path, "a") as log:
        code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT)
    if is_finished(sweep_dir / name):
        return {"state": "finished"}
    return {"error": f"torchrun exited with code {code} (see {log_path})"}


# ---------------------------------------------------------------------------------------------------------------
# Executors


def _print_now(line: str) -> None:
    print(line, flush=True)  # a log file gets each line when it happens, as a terminal does


SWEEP_LOCK = ".instill-sweep"  # in every sweep directory: held by the process that runs the sweep


def run_sweep(sweep: Sweep, *, progress=_print_now) -> dict[str, dict[str, Any]]:
    """Record the sweep, then run every point that is not finished; returns each point's outcome by name.

    Raises:
        UserError: another process runs a sweep in this directory (nothing is written then).
    """
    created = first_missing(sweep.path)
    lock = _own_sweep_dir(sweep.path, created)
    try:
        try:
            write_record(sweep)
        except UserError:  # a read-only or full disk: leave no empty sweep directory behind
            if created is not None:
                shutil.rmtree(created, ignore_errors=True)
            raise
        return _run_owned_sweep(sweep, progress)
    finally:
        lock.release()


def _own_sweep_dir(path: Path, created: Optional[Path]) -> RunLock:
    """The sweep directory's lock (created with it): a second sweep into it would rerun points the first is
    running and report them failed, "in use" by the first; it is refused instead, before it writes anything."""
    make_directory(path)
    try:
        lock = RunLock.try_take(path, create=True, file=SWEEP_LOCK)
    except OSError as err:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        raise write_error(path / SWEEP_LOCK, err) from None
    if lock is None:
        raise UserError(f"{path} is owned by the sweep of {lock_owner(path, SWEEP_LOCK)}: wait for it to end "
                        "(rerunning the same command then resumes it), or choose another --out")
    return lock


def _run_owned_sweep(sweep: Sweep, progress) -> dict[str, dict[str, Any]]:
    status = {p["name"]: {"name": p["name"], "state": point_state(sweep.path, p["name"])} for p in sweep.points}
    todo = [name for name, s in status.items() if s["state"] != "finished"]
    for name, s in status.items():
        if s["state"] == "finished":
            s.update(read_json(sweep.path / "points" / f"{name}.json") or {}, state="finished")
    progress(f"sweep {sweep.path}: {len(sweep.points)} points, {len(sweep.points) - len(todo)} finished, "
             f"{len(todo)} to run ({sweep.executor})")
    _write_status(sweep, status)

    started, ended = time.perf_counter(), []

    def done(outcome: dict[str, Any]) -> None:
        status[outcome["name"]] = outcome
        _write_status(sweep, status)
        ended.append(outcome["name"])
        extra = f": {outcome['error']}" if outcome.get("error") else ""
        left = time_left(time.perf_counter() - started, len(ended), len(todo))
        progress(f"  {outcome['name']}: {outcome['state']} ({outcome.get('duration_s', 0):.1f} s){extra} | "
                 f"{len(ended)} of {len(todo)} done" + (f", {left} in this sweep" if left else ""))

    if todo and sweep.executor == "local":
        todo = _without_queued_slurm_jobs(sweep, todo, done)
    if todo:
        run = _run_local if sweep.executor == "local" else _run_slurm
        run(sweep, todo, done)
    return status


def _without_queued_slurm_jobs(sweep: Sweep, todo: list[str], done) -> list[str]:
    """A local rerun of a sweep submitted to SLURM leaves the points whose job is still queued or running to that
    job (state ``queued``), so that no point runs twice at once."""
    submitted = [n for n in todo if point_state(sweep.path, n) == "submitted"]
    if not submitted or slurm_problem() is not None:  # no controller: no job of it can still run
        return todo
    queued = live_slurm_jobs(sweep.path, submitted)
    for name, (job_id, state) in queued.items():
        done({"name": name, "state": "queued", "slurm_job": job_id,
              "error": f"SLURM job {job_id} is {state}: rerun with the slurm executor to wait for it"})
    return [n for n in todo if n not in queued]


def _own_debris(path: Path) -> bool:
    """What a sweep killed before its sweep.json existed leaves: its lock file, a half-written sweep.json."""
    return path.name == SWEEP_LOCK or (path.name.startswith(".sweep.json.") and path.name.endswith(".tmp"))


def write_record(sweep: Sweep) -> None:
    """Create the sweep directory with its ``sweep.json`` (the grid and the points); a half-written sweep.json of
    a sweep killed while writing it goes (this process holds the sweep's lock)."""
    make_directory(sweep.path)
    for stale in sweep.path.glob(".sweep.json.*.tmp"):
        remove_quietly(str(stale))
    atomic_write_json(sweep.path / "sweep.json", sweep.record)


def _write_status(sweep: Sweep, status: dict[str, dict[str, Any]]) -> None:
    counts: dict[str, int] = {}
    for outcome in status.values():
        counts[outcome["state"]] = counts.get(outcome["state"], 0) + 1
    atomic_write_json(sweep.path / "status.json", {"counts": counts, "points": status})


def _run_local(sweep: Sweep, todo: list[str], done) -> None:
    """``workers`` processes forked from this one after it imported what every point needs (PRELOAD): a point
    starts at once, and the workers run the points one after another, each a normal run of its stage."""
    import importlib
    import multiprocessing

    settings = sweep.spec.executor
    workers = min(settings.workers or os.cpu_count() or 1, len(todo))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # libraries that read it at start-up in a worker
        os.environ[var] = str(settings.threads)
    os.environ.setdefault("MPLBACKEND", "Agg")  # workers only save figures
    for module in PRELOAD:
        importlib.import_module(module)
    import_builtins()
    # fork shares the imports; where it is unsafe (macOS) or missing, spawn imports them again in each worker
    method = "fork" if sys.platform.startswith("linux") else "spawn"
    queue = list(todo)
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(method),
                             initializer=_start_worker, initargs=(os.getpid(),)) as pool:
        pending: dict[Any, str] = {}
        try:
            while pending or queue:
                # one point per worker at a time: after Ctrl-C no queued point starts in a worker
                while queue and len(pending) < workers:
                    name = queue.pop(0)
                    try:
                        pending[pool.submit(run_point, sweep.path, name, settings.threads)] = name
                    except BrokenProcessPool as err:  # a worker died: what is left runs on the next rerun
                        done({"name": name, "state": "failed", "error": f"not started: {_one_line(err)}"})
                if not pending:
                    continue
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in finished:
                    name = pending.pop(future)
                    try:
                        done(future.result())
                    except Exception as err:  # the worker process itself died (killed, out of memory)
                        done({"name": name, "state": "failed", "error": f"worker process died ({_one_line(err)})"})
        except KeyboardInterrupt:  # the workers got the Ctrl-C too: their points save their state and return
            queue.clear()
            raise


def _start_worker(parent: int) -> None:
    _die_with_parent(parent)
    _own_progress_lock()


def _die_with_parent(parent: int) -> None:
    """End this worker when the sweep's process ends, however it ends (kill -9 included): an orphaned worker would
    block forever waiting for work, holding its memory. Linux delivers SIGKILL to it when its parent dies (its point
    resumes from its last saved state on the next run); elsewhere the pool's own pipe ends it when it next waits."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)


def _own_progress_lock() -> None:
    """A worker's own lock for tqdm's progress bars. tqdm's default lock is a multiprocessing lock inherited from
    this process: a worker killed while holding it (out of memory, kill -9) would leave every other worker, and this
    process, waiting for it forever at their next progress bar."""
    import threading

    from tqdm.auto import tqdm

    tqdm.set_lock(threading.RLock())


SLURM_ACTIVE = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED", "REQUEUE_HOLD",
                "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED"}


def slurm_job_state(job_id: str) -> Optional[str]:
    """The queue's state of a SLURM job (``PENDING``, ``RUNNING``, ...; an array task as ``ARRAY_TASK``), or None
    once it has left the queue. squeue, not sacct: sacct lists no task of a job array that has not started.

    Raises:
        UserError: squeue cannot say (the controller does not answer): resubmitting could run a point twice.
    """
    try:
        answer = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True,
                                timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise UserError(f"cannot ask SLURM about job {job_id} (squeue: {_one_line(err)}); nothing submitted") \
            from None
    if answer.returncode != 0:
        if "invalid job id" in answer.stderr.lower():  # gone from the queue (finished long enough ago)
            return None
        raise UserError(f"cannot ask SLURM about job {job_id} (squeue: {answer.stderr.strip()}); nothing "
                        "submitted") from None
    states = answer.stdout.split()
    return states[0] if states else None


def live_slurm_jobs(sweep_dir: Path, names: list[str]) -> dict[str, tuple[str, str]]:
    """The points among ``names`` submitted to SLURM whose job is still queued or running: name -> (job id,
    state). A rerun waits for these jobs instead of submitting the points again."""
    live = {}
    for name in names:
        recorded = read_json(sweep_dir / "points" / f"{name}.json") or {}
        job_id = recorded.get("slurm_job")
        if recorded.get("state") == "submitted" and isinstance(job_id, str):
            state = slurm_job_state(job_id)
            if state in SLURM_ACTIVE:
                live[name] = (job_id, state)
    return live


def _run_slurm(sweep: Sweep, todo: list[str], done) -> None:
    """One SLURM job array through submitit: a task per point, at most ``array_parallelism`` at once. Points whose
    job from an earlier run is still queued or running are adopted: waited for, not submitted again."""
    import submitit

    folder = sweep.path / "slurm" / "%j"
    adopted = live_slurm_jobs(sweep.path, todo)
    pending: dict[str, Any] = {}
    for name, (job_id, state) in adopted.items():
        pending[name] = submitit.SlurmJob(folder=folder, job_id=job_id)
        print(f"  {name}: adopted SLURM job {job_id} ({state}), not submitted again", flush=True)
    todo = [name for name in todo if name not in adopted]
    if todo:
        pending.update(_submit_array(sweep, todo, folder))
    try:
        _wait_for_jobs(sweep, pending, done)
    except KeyboardInterrupt:  # Ctrl-C: no job of this sweep is left queued or running behind the user's back
        _cancel_jobs(sweep, pending)
        raise


def _cancel_jobs(sweep: Sweep, pending: dict[str, Any]) -> None:
    """Cancel the jobs still queued or running; their points resume from their saved state on the next run."""
    for name, job in pending.items():
        with contextlib.suppress(Exception):  # already ended, or the controller is gone: nothing left to cancel
            job.cancel(check=False)
        atomic_write_json(sweep.path / "points" / f"{name}.json",
                          {"name": name, "state": "interrupted", "slurm_job": job.job_id,
                           "error": "interrupted: its SLURM job was cancelled (rerun the sweep to resume it)"})
    if pending:
        print(f"  cancelled {len(pending)} SLURM job(s) of this sweep", flush=True)


def _wait_for_jobs(sweep: Sweep, pending: dict[str, Any], done) -> None:
    while pending:
        for name, job in list(pending.items()):
            if not job.done():
                continue
            del pending[name]
            try:
                done(job.result())
            except Exception as err:  # the job itself failed: time limit, cancelled, node failure
                outcome = read_json(sweep.path / "points" / f"{name}.json") or {}
                done({"name": name, "state": "failed", "job_id": job.job_id,
                      "error": f"SLURM job {job.job_id} {job.state}: {_one_line(err)}",
                      "duration_s": outcome.get("duration_s", 0)})
        if pending:
            time.sleep(1.0)


def _submit_array(sweep: Sweep, todo: list[str], folder: Path) -> dict[str, Any]:
    """Submit ``todo`` as one job array; each point's state records its job id (``submitted``), so that a rerun
    finds the job, unless the job was quicker and has already written its outcome."""
    import submitit

    s = sweep.spec.executor.slurm
    processes = s.processes_per_point or (s.gpus_per_node if s.gpus_per_node > 1 else 1)
    executor = submitit.AutoExecutor(folder=str(folder), cluster="slurm")
    params: dict[str, Any] = {"timeout_min": s.time_min, "cpus_per_task": s.cpus_per_task, "nodes": 1,
                              "tasks_per_node": 1, "slurm_array_parallelism": s.array_parallelism,
                              "name": f"instill-{sweep.path.name}"}
    if s.partition:
        params["slurm_partition"] = s.partition
    if s.gpus_per_node:
        params["gpus_per_node"] = s.gpus_per_node
    if s.mem_gb:
        params["mem_gb"] = s.mem_gb
    if s.additional:
        params["slurm_additional_parameters"] = dict(s.additional)
    executor.update_parameters(**params)
    n = len(todo)
    records = {name: read_json(sweep.path / "points" / f"{name}.json") for name in todo}
    jobs = executor.map_array(run_point, [str(sweep.path.resolve())] * n, todo,
                              [sweep.spec.executor.threads] * n, [processes] * n)
    (sweep.path / "points").mkdir(exist_ok=True)
    for name, job in zip(todo, jobs):
        if read_json(sweep.path / "points" / f"{name}.json") != records[name]:
            continue  # its job already ran and wrote its outcome (which names the job too)
        atomic_write_json(sweep.path / "points" / f"{name}.json",
                          {"name": name, "state": "submitted", "slurm_job": job.job_id,
                           "submitted_at": round(time.time(), 3)})
    jobs_file = sweep.path / "slurm" / "jobs.json"  # every job of the sweep, the earlier submissions' too
    atomic_write_json(jobs_file, {**(read_json(jobs_file) or {}), **{name: job.job_id for name, job in
                                                                     zip(todo, jobs)}})
    print(f"  submitted job array {jobs[0].job_id.split('_')[0]} ({n} tasks)", flush=True)
    return dict(zip(todo, jobs))


# ---------------------------------------------------------------------------------------------------------------
# Command line


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m instill.sweep", description=__doc__.splitlines()[0])
    parser.add_argument("sweep", nargs="?", help="sweep file (YAML with a sweep: section), or a stage config with "
                                                 "--grid")
    parser.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                        help="sweep these values of a config key (repeatable: every combination)")
    parser.add_argument("--set", dest="values", action="append", default=[], metavar="KEY=VALUE",
                        help="a config value at every point (repeatable)")
    parser.add_argument("--stage", help="the stage of a config swept with --grid (default: the config's own)")
    parser.add_argument("--out", help="sweep directory (overrides sweep.output_dir)")
    parser.add_argument("--executor", choices=["auto", "local", "slurm"], help="overrides sweep.executor.kind")
    parser.add_argument("--workers", type=int, help="local executor: parallel points (default: the CPU cores)")
    parser.add_argument("--validate", action="store_true", help="check every point's config and exit")
    parser.add_argument("--list", action="store_true", help="list the points and their state, and exit")
    parser.add_argument("--point", nargs=2, metavar=("SWEEP_DIR", "NAME"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.point:  # one point in this process (under torchrun: every rank)
        outcome = _point_main(*args.point)
        return 0 if outcome["state"] == "finished" else 1
    if args.sweep is None:
        parser.error("the sweep file is required")
    return exit_code_of(lambda: _sweep_command(args), "interrupted: rerun the same command to resume the sweep")


def _sweep_command(args: argparse.Namespace) -> int:
    if args.workers is not None and args.workers < 1:
        raise UserError("--workers must be at least 1")
    sweep = prepare(args.sweep, args.out, args.executor, args.workers, args.grid, args.values, args.stage)
    if args.validate:
        print(f"{args.sweep}: valid sweep of {len(sweep.points)} points ({sweep.executor} executor)")
        return 0
    if args.list:
        for p in sweep.points:
            state = point_state(sweep.path, p["name"]) if sweep.path.exists() else "pending"
            print(f"{p['name']}  {state}  {p['config']}  {json.dumps(p['values'], default=str)}")
        return 0
    status = run_sweep(sweep)
    failed = {n: s for n, s in status.items() if s["state"] != "finished"}
    print(f"sweep {sweep.path}: {len(status) - len(failed)} of {len(status)} points finished")
    for name, outcome in failed.items():
        print(f"  {outcome['state']}: {name}: {outcome.get('error')}")
    if failed:
        print("rerun the same command to rerun failed points and resume interrupted ones")
    return 1 if failed else 0


def _point_main(sweep_dir: str, name: str) -> dict[str, Any]:
    from . import dist

    if dist.world_size() > 1 and not dist.is_main():  # the other ranks: their output would only repeat rank 0's
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
            return _run_in_process(Path(sweep_dir), name, 1)
    return run_point(sweep_dir, name)
