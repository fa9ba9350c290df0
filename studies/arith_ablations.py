"""Causal ablations of the 2-layer arithmetic preset's masks over fresh seeds (issue 20).

    python studies/arith_ablations.py run --seeds 4 [--start K]     # base + ablate per seed, one thread
    python studies/arith_ablations.py summary [--markdown]

``run`` trains seed after seed into ``checkpoints/ablations/s<k>/{base,ablate}`` (configs/math_2l_base.yaml, then
configs/math_2l_ablate.yaml on that base), one process at a time on one thread; every stage draws its seed from
entropy and records it. A finished stage is skipped, so rerunning continues. Two queues side by side:
``run --start 1 --seeds 1`` and ``run --start 2 --seeds 2``, and so on. The ablate stage itself runs the ablations
(``ablations:`` section, 5 draws).

``summary`` prints per finished seed the mask's density and the test accuracy on the subtask ((a*b) mod 7) and on the
base task ((a + a*b) mod 7) with the whole model, the subnetwork alone, the subnetwork removed (``zero_ablate``) or
randomised (``random_ablate``), a random set of the same size per layer removed (``randomly_sampled``) and one drawn
outside the subnetwork (``complement_sampled``), the drawn modes as the mean of their draws; then the mean, standard
deviation and range of each column over the seeds.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from arith_seeds import run_stage  # the same stage runner: one thread, skipped when finished, a log per stage

ROOT = Path(__file__).resolve().parent.parent
STUDY = ROOT / "checkpoints" / "ablations"
MODES = ["full_model", "subnetwork", "zero_ablate", "random_ablate", "randomly_sampled", "complement_sampled"]
SETS = ["subtask", "base_task"]


def run(args: argparse.Namespace) -> None:
    for k in range(args.start, args.seeds + 1):
        seed_dir = STUDY / f"s{k}"
        seed_dir.mkdir(parents=True, exist_ok=True)
        run_stage("base", seed_dir / "base", [])
        run_stage("ablate", seed_dir / "ablate", [f"base={seed_dir / 'base'}"])


def seed_rows() -> list[dict]:
    rows = []
    for seed_dir in sorted(STUDY.glob("s*"), key=lambda p: int(p.name[1:])):
        path = seed_dir / "ablate" / "summary.json"
        if not path.is_file():
            continue
        summary = json.loads(path.read_text())
        modes = summary["ablations"]["modes"]
        row = {"seed": seed_dir.name, "density": summary["density"]}
        for data in SETS:
            for mode in MODES:
                row[f"{data}:{mode}"] = modes[mode][f"{data}_acc"]["mean"]
        rows.append(row)
    return rows


def summary(args: argparse.Namespace) -> None:
    rows = seed_rows()
    if not rows:
        raise SystemExit(f"no finished ablate run under {STUDY}")
    columns = ["density"] + [f"{data}:{mode}" for data in SETS for mode in MODES]
    stats = {}
    for column in columns:
        values = [row[column] for row in rows]
        stats[column] = (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0,
                         min(values), max(values))
    if args.markdown:
        print("| seed | " + " | ".join(columns) + " |")
        print("|---" * (len(columns) + 1) + "|")
        for row in rows:
            print(f"| {row['seed']} | " + " | ".join(f"{row[c]:.4f}" for c in columns) + " |")
        print("| mean +- sd | " + " | ".join(f"{stats[c][0]:.4f} +- {stats[c][1]:.4f}" for c in columns) + " |")
        return
    for row in rows:
        print(row["seed"], " ".join(f"{c}={row[c]:.4f}" for c in columns))
    for column in columns:
        mean, sd, low, high = stats[column]
        print(f"{column:30s} mean {mean:.4f} sd {sd:.4f} range [{low:.4f}, {high:.4f}] (n = {len(rows)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run_parser = sub.add_parser("run")
    run_parser.add_argument("--seeds", type=int, required=True)
    run_parser.add_argument("--start", type=int, default=1)
    summary_parser = sub.add_parser("summary")
    summary_parser.add_argument("--markdown", action="store_true")
    args = parser.parse_args()
    {"run": run, "summary": summary}[args.command](args)


if __name__ == "__main__":
    main()
