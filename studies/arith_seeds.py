"""Seed study of the 2-layer arithmetic preset (issue 14): the whole pipeline (base, ablate, transfer) on fresh seeds.

    python studies/arith_seeds.py run TAG --seeds 10 [--start K] [--base-set K=V ...] [--ablate-set K=V ...]
                                          [--transfer-set K=V ...] [--base-from TAG] [--mask-from TAG]
                                          [--transfer-seed-from TAG]
    python studies/arith_seeds.py summary TAG [TAG ...] [--against TAG]

``run`` trains seed after seed, one process at a time on one thread, into ``checkpoints/arith/TAG/s<k>/{base,ablate,
transfer}``. Every stage draws its seed from entropy (the configs' ``reproducibility.reproduce: false``); each run
directory records it and replays. A stage whose run directory is finished is skipped, so rerunning the same command
continues an interrupted study; ``--seeds`` counts seed directories, so raising it adds seeds. ``--base-from`` and
``--mask-from`` reuse another study's base runs (or masks) seed for seed, so a variant of a downstream stage is
compared on the very same upstream models (paired); the upstream is then not trained again. ``--transfer-seed-from``
replays that study's transfer seed (its run's drawn seed, ``reproducibility.reproduce: true``): every condition then
sees the same data, initialisation and batches as there, so a variant that changes only some conditions need not
rerun the others (``summary --against`` fills the missing conditions from that study, seed for seed).

The transfer is cut to n = 400 and the conditions subnet, random_init and sampled_subnet (``CUT``): every sub-run
of the transfer stage derives its data, initialisation and batches from the run seed, n, and the condition, so the
cut changes none of the remaining sub-runs. ``--transfer-set`` overrides come after the cut and may undo it.

``summary`` prints per seed: base steps, mask density, the test accuracy of each condition, subnet - random_init and
subnet - sampled_subnet; then mean, standard deviation and a 95% t-interval of each, and how many seeds reach
subnet - random_init >= 0.25. ``--against TAG``: paired differences of subnet - sampled_subnet with that study.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STUDIES = ROOT / "checkpoints" / "arith"
CONFIGS = {"base": "configs/math_2l_base.yaml", "ablate": "configs/math_2l_ablate.yaml",
           "transfer": "configs/math_2l_transfer.yaml"}
CUT = ["transfer.n_disambiguation=[400]", "transfer.conditions=[subnet,random_init,sampled_subnet]"]
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
# two-sided 95% Student t quantiles by degrees of freedom
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
       11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 19: 2.093, 24: 2.064, 29: 2.045}


def finished(run_dir: Path) -> bool:
    return (run_dir / "summary.json").is_file()


def run_stage(stage: str, out: Path, overrides: list[str]) -> None:
    """One stage into ``out`` (skipped when finished), one thread; raises on failure."""
    if finished(out):
        return
    cmd = [sys.executable, f"math/{stage}.py", CONFIGS[stage], "--out", str(out), "--set", "train.threads=1",
           "--set", "train.progress=false"]
    for item in overrides:
        cmd += ["--set", item]
    log = out.parent / f"{stage}.log"
    start = time.time()
    with open(log, "w") as handle:
        code = subprocess.call(cmd, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT, env={**os.environ, **ONE_THREAD})
    print(f"  {stage}: exit {code} in {time.time() - start:.0f} s ({log})", flush=True)
    if code != 0:
        raise SystemExit(f"{stage} failed; see {log}")


def run(args: argparse.Namespace) -> None:
    for k in range(args.start, args.seeds + 1):
        seed_dir = STUDIES / args.tag / f"s{k}"
        seed_dir.mkdir(parents=True, exist_ok=True)
        print(f"{args.tag} s{k}", flush=True)
        if args.mask_from:
            mask = STUDIES / args.mask_from / f"s{k}" / "ablate"
        else:
            base = STUDIES / args.base_from / f"s{k}" / "base" if args.base_from else seed_dir / "base"
            if not args.base_from:
                run_stage("base", base, args.base_set)
            if not finished(base):
                raise SystemExit(f"no finished base run in {base}")
            mask = seed_dir / "ablate"
            run_stage("ablate", mask, [f"base={base}", *args.ablate_set])
        if not finished(mask):
            raise SystemExit(f"no finished ablate run in {mask}")
        replay = []
        if args.transfer_seed_from:
            source = STUDIES / args.transfer_seed_from / f"s{k}" / "transfer"
            if not finished(source):
                raise SystemExit(f"no finished transfer run in {source}")
            seed = read(source / "summary.json")["seed"]
            replay = ["reproducibility.reproduce=true", f"reproducibility.random_seed={seed}"]
        run_stage("transfer", seed_dir / "transfer", [f"transfer.mask={mask}", *CUT, *replay, *args.transfer_set])


def read(path: Path) -> dict:
    return json.loads(path.read_text())


def seed_rows(tag: str) -> list[dict]:
    """One row per finished seed of a study: upstream facts and test accuracy per condition (at each n)."""
    rows = []
    for seed_dir in sorted((STUDIES / tag).glob("s*"), key=lambda p: int(p.name[1:])):
        transfer = seed_dir / "transfer"
        if not finished(transfer):
            continue
        summary = read(transfer / "summary.json")
        cfg_mask = mask_dir_of(transfer)
        ablate = read(cfg_mask / "summary.json")
        base_ref = read(cfg_mask / "mask.json").get("base_run") if (cfg_mask / "mask.json").is_file() else None
        base_dir = cfg_mask / base_ref if base_ref else None  # stored relative to the mask directory
        base = read(base_dir / "summary.json") if base_dir and finished(base_dir) else {}
        row = {"seed": seed_dir.name, "base_seed": base.get("seed"), "mask_seed": ablate.get("seed"),
               "transfer_seed": summary.get("seed"), "base_steps": base.get("steps"),
               "density": ablate.get("density"), "mask_acc": ablate.get("val_acc")}
        for result in summary["results"]:
            row[f"{result['condition']}@{result['n_disambiguation']}"] = result["test_acc"]
        rows.append(row)
    return rows


def mask_dir_of(transfer: Path) -> Path:
    for line in (transfer / "config.yaml").read_text().splitlines():
        if line.strip().startswith("mask:"):
            path = Path(line.split(":", 1)[1].strip())
            return path if path.is_absolute() else ROOT / path
    raise SystemExit(f"{transfer}: no transfer.mask in config.yaml")


def stats(values: list[float]) -> str:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return f"mean {mean:+.3f} (one seed)"
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    t = T95.get(n - 1, T95[max(d for d in T95 if d <= n - 1)])
    half = t * sd / math.sqrt(n)
    return f"mean {mean:+.3f}  sd {sd:.3f}  95% CI [{mean - half:+.3f}, {mean + half:+.3f}]  (n={n})"


def summary(args: argparse.Namespace) -> None:
    for tag in args.tags:
        rows = seed_rows(tag)
        if args.against and tag != args.against:  # conditions a replayed variant did not rerun: the same as there
            other = {row["seed"]: row for row in seed_rows(args.against)}
            for row in rows:
                if row["seed"] in other and row["transfer_seed"] == other[row["seed"]]["transfer_seed"]:
                    for key, value in other[row["seed"]].items():
                        row.setdefault(key, value)
        print(f"== {tag}: {len(rows)} finished seeds")
        if not rows:
            continue
        ns = sorted({key.split("@")[1] for row in rows for key in row if "@" in key})
        for n in ns:
            for row in rows:
                if f"subnet@{n}" in row:
                    row[f"sub-rand@{n}"] = row[f"subnet@{n}"] - row.get(f"random_init@{n}", float("nan"))
                    row[f"sub-samp@{n}"] = row[f"subnet@{n}"] - row.get(f"sampled_subnet@{n}", float("nan"))
        columns = list(dict.fromkeys(key for row in rows for key in row))
        width = {c: max(len(c), *(len(fmt(row.get(c))) for row in rows)) for c in columns}
        print("  ".join(f"{c:>{width[c]}}" for c in columns))
        for row in rows:
            print("  ".join(f"{fmt(row.get(c)):>{width[c]}}" for c in columns))
        for column in columns:
            values = [row[column] for row in rows if isinstance(row.get(column), (int, float))
                      and not math.isnan(row[column])]
            if values and not column.endswith("_seed"):
                print(f"  {column:>22}: {stats(values)}")
        for n in ns:
            gains = [row[f"sub-rand@{n}"] for row in rows if f"sub-rand@{n}" in row]
            print(f"  n={n}: subnet - random_init >= 0.25 on {sum(g >= 0.25 for g in gains)} of {len(gains)} seeds")
        if args.against and tag != args.against:
            other = {row["seed"]: row for row in seed_rows(args.against)}
            for key in [c for c in columns if c.startswith(("sub-samp@", "subnet@", "sampled_subnet@"))]:
                diffs = [row[key] - other[row["seed"]][key] for row in rows
                         if row["seed"] in other and key in other[row["seed"]]]
                if diffs:
                    print(f"  paired {key} ({tag} - {args.against}): " + " ".join(f"{d:+.3f}" for d in diffs)
                          + f"\n      {stats(diffs)}")


def fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return "" if value is None else str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    go = commands.add_parser("run", help="train seeds of one study")
    go.add_argument("tag")
    go.add_argument("--seeds", type=int, default=10)
    go.add_argument("--start", type=int, default=1, help="begin at seed directory s<start> (two queues side by side)")
    go.add_argument("--base-set", action="append", default=[], metavar="K=V")
    go.add_argument("--ablate-set", action="append", default=[], metavar="K=V")
    go.add_argument("--transfer-set", action="append", default=[], metavar="K=V")
    go.add_argument("--base-from", help="reuse this study's base runs (seed for seed)")
    go.add_argument("--mask-from", help="reuse this study's masks (seed for seed)")
    go.add_argument("--transfer-seed-from", help="replay this study's transfer seeds (seed for seed)")
    show = commands.add_parser("summary", help="tables of finished seeds")
    show.add_argument("tags", nargs="+")
    show.add_argument("--against", help="paired differences with this study")
    args = parser.parse_args()
    run(args) if args.command == "run" else summary(args)


if __name__ == "__main__":
    main()
