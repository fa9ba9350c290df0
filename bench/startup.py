"""Start-up time of the entry scripts against ``import torch`` alone, measured as whole processes.

Prints, last, one JSON object:

* ``validate_ratio``: wall time of ``python vision/vision_base.py configs/vision_base_digits.yaml --validate``
  (the README's command) over that of ``python -c "import torch"``, the median of the per-round ratios. Target
  <= 1.2.
* ``help_ratio``: the same for ``python vision/vision_base.py --help``. Target <= 1.2.
* ``transfer_validate_ratio``: ``python math/transfer.py configs/math_2l_transfer.yaml --validate`` (token data
  and a GPT-2 model, a different set of libraries) against the same baseline.
* ``torch_s``, ``validate_s``, ``help_s``, ``transfer_validate_s``: the medians; ``runs`` per command;
  ``load_before`` (1-minute load average when the bench started: on a shared machine every process is slower, and
  the ratios are what to read).

The commands run in turns, in a rotated order (``timing.interleaved_times``), so that a change of the machine's
load falls on all of them alike. Run from the repository root: ``python bench/startup.py`` (5 runs each) or
``--quick`` (2 runs each).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from timing import interleaved_times, median_ratio

REPO = Path(__file__).resolve().parent.parent
COMMANDS = {
    "torch": [sys.executable, "-c", "import torch"],
    "validate": [sys.executable, "vision/vision_base.py", "configs/vision_base_digits.yaml", "--validate"],
    "help": [sys.executable, "vision/vision_base.py", "--help"],
    "transfer_validate": [sys.executable, "math/transfer.py", "configs/math_2l_transfer.yaml", "--validate"],
}


def timed(command: list[str]) -> float:
    """Wall seconds of one process, from its start to its exit; a failing command stops the bench."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # as on a user's machine, the first (untimed) run writes the bytecode caches the later runs read: without them
    # every run compiles instill's sources again (about 60 ms of a 3 s start-up)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"bench: {' '.join(command[1:])} failed: {proc.stderr.strip()[-300:]}")
    return elapsed


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 runs of each command instead of 5")
    parser.add_argument("--runs", type=int, default=None, help="runs of each command")
    args = parser.parse_args(argv)
    runs = args.runs or (2 if args.quick else 5)
    load = os.getloadavg()[0]
    walls: dict[str, list[float]] = {name: [] for name in COMMANDS}
    steps = {name: (lambda name=name: walls[name].append(timed(COMMANDS[name]))) for name in COMMANDS}
    interleaved_times(steps, runs, warmup=1)  # the first round warms the file cache, untimed
    times = {name: values[1:] for name, values in walls.items()}
    medians = {name: statistics.median(values) for name, values in times.items()}
    for name, values in times.items():
        print(f"{name:18s} median {medians[name]:.2f} s  ({', '.join(f'{v:.2f}' for v in values)})", flush=True)
    result = {f"{name}_ratio": round(median_ratio(times[name], times["torch"]), 3) for name in COMMANDS
              if name != "torch"}
    result.update({f"{name}_s": round(value, 3) for name, value in medians.items()})
    result.update(runs=runs, load_before=round(load, 2))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
