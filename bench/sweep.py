"""Speed of the local sweep executor against the same points run one after the other in one process.

Prints, last, one JSON object:

* ``speedup``: wall time of the 8 points run one after the other in this process (``instill.stages.execute`` on
  each point's config, one torch thread) divided by the wall time of ``python -m instill.sweep``'s local executor
  with 2 workers on the same points (from the validation of the sweep file to the last point's outcome). Target
  >= 1.7 on 2 free cores.
* ``overhead_per_point_s``: what the sweep machinery adds to each point beyond its own run: the point's wall time
  in its worker (config check, run, outcome and log files) minus the run's own ``duration_s``, averaged, plus the
  mean gap between one point's end and the next point's start in the same worker. Target < 0.5 s.
* ``startup_s``: once per sweep, from starting ``python -m instill.sweep`` to its first point (Python, torch, the
  stages, the validation of every point, forking the workers); ``sequential_startup_s``: the same for the one
  process (Python, torch, the stages).
* ``sequential_s``, ``sweep_s``, ``point_run_s`` (the runs' own mean duration) and ``load_before`` (1-minute load
  average when the bench started: on a shared machine the speedup is bounded by the free cores).

Run from the repository root: ``python bench/sweep.py`` (8 points of the tiny digits FCN, 6 epochs each),
``--quick`` (2 epochs each) or ``--epochs N``. Each side starts one process, so the sweep's start-up (~2.5 s: Python,
torch and torch._dynamo, the stages, every point's validation, the fork) against the sequential process's (~1.1 s,
its first point then importing torch._dynamo) bounds the speedup for short points, and two processes side by side
run slower than one alone (pure matrix work in two forked processes scaled 1.81-1.85x on the 2-core machine).
Measured with nothing else running (stop 17): 1.14-1.26x at 6 epochs (0.24 s points), 1.28x at 40 (0.62 s), 1.55x
at 200 (2.6 s), 1.68x at 400 (5.3 s), 1.74x at 800 (12 s); overhead per point 0.018-0.021 s throughout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / "tests" / "configs" / "tiny_digits.yaml"


def sweep_file(folder: Path, epochs: int, points: int) -> Path:
    path = folder / "bench_sweep.yaml"
    seeds = list(range(1, points + 1))
    path.write_text(
        "sweep:\n"
        f"  config: {CONFIG}\n"
        "  stage: base\n"
        f"  grid: {{reproducibility.random_seed: {seeds}}}\n"
        f"  set: {{reproducibility.reproduce: true, train.epochs: {epochs}, train.threads: 1, train.progress: false}}\n"
        "  executor: {kind: local, workers: 2, threads: 1}\n")
    return path


def run_sequential(sweep_path: Path, out: Path) -> None:
    """The points one after the other in this process, each a normal run of its stage (``--sequential``)."""
    import torch

    from instill.stages import execute
    from instill.sweep import expand_points, load_sweep, point_config

    torch.set_num_threads(1)
    out.mkdir(parents=True)
    (out / "first_point_at").write_text(str(time.time()))
    for point in expand_points(load_sweep(sweep_path), str(sweep_path)):
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
            execute(point_config(point, out / point["name"], "bench"))


def timed(command: list[str]) -> float:
    """Wall time of a fresh process: both sides pay for starting Python and importing torch."""
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return time.perf_counter() - start


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 epochs per point instead of 6")
    parser.add_argument("--points", type=int, default=8)
    parser.add_argument("--epochs", type=int, help="epochs per point (default 6; 2 with --quick)")
    parser.add_argument("--sequential", nargs=2, metavar=("SWEEP", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.sequential:
        run_sequential(Path(args.sequential[0]), Path(args.sequential[1]))
        return {}
    os.environ["OMP_NUM_THREADS"] = "1"
    load = os.getloadavg()[0]
    folder = Path(tempfile.mkdtemp(prefix="instill-bench-sweep-"))
    try:
        path = sweep_file(folder, args.epochs or (2 if args.quick else 6), args.points)
        launched = {"sequential": time.time()}
        sequential = timed([sys.executable, __file__, "--sequential", str(path), str(folder / "sequential")])
        launched["first_sequential"] = float((folder / "sequential" / "first_point_at").read_text())
        launched["swept"] = time.time()
        swept = timed([sys.executable, "-m", "instill.sweep", str(path), "--out", str(folder / "swept")])
        status = json.loads((folder / "swept" / "status.json").read_text())["points"]
        failed = [n for n, s in status.items() if s["state"] != "finished"]
        if failed:
            raise SystemExit(f"bench: points failed: {failed}")
        own = {n: json.loads((folder / "swept" / n / "summary.json").read_text())["duration_s"] for n in status}
        in_worker = [s["duration_s"] - own[n] for n, s in status.items()]
        starts = sorted(s["started_at"] for s in status.values())
        ends = sorted(s["started_at"] + s["duration_s"] for s in status.values())
        gaps = [start - end for start, end in zip(starts[2:], ends[:-2])]  # 2 workers: each start follows an end
        result = {
            "speedup": round(sequential / swept, 3),
            "overhead_per_point_s": round(statistics.mean(in_worker) + max(0.0, statistics.mean(gaps or [0.0])), 3),
            "startup_s": round(starts[0] - launched["swept"], 2),
            "sequential_startup_s": round(launched["first_sequential"] - launched["sequential"], 2),
            "sequential_s": round(sequential, 2),
            "sweep_s": round(swept, 2),
            "point_run_s": round(statistics.mean(own.values()), 2),
            "points": len(status),
            "workers": 2,
            "load_before": round(load, 2),
        }
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
