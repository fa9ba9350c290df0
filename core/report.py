"""Tables and plots over run directories.

    python -m instill.report checkpoints/           one row per run: name, stage, seed, status, duration, key metrics
    python -m instill.report checkpoints/ --plot    also plot each run's curves into reports/curves/ (--plot-dir)
    python -m instill.report SWEEP_DIR [--metric M] [--x KEY]
                                                    a sweep: one row per point, then mean, std and count over
                                                    seeds per condition; CSVs and M-against-KEY plots in report/

Run directories are found at any depth below the folder; a sweep's sub-runs (one per condition, n, lr) follow their
run as ``run/sub-run`` rows with their own figures. Broken or unfinished run directories are listed as such; the
report never crashes on them. The figures are drawn with ``instill.plots``, as the stages draw theirs.
"""

from __future__ import annotations

if __name__ == "__main__":  # python -m instill.report: nothing below runs in this copy
    from instill.errors import run_module

    run_module("instill.report")

import argparse
import sys
from pathlib import Path
from typing import Any, Optional

from .files import make_directory, read_json
from .plots import describe, format_table, plot_lines, plot_points, plot_runs
from .registry import import_builtins
from .run import has_state, read_metrics, sub_runs

KEY_METRICS = ("test_acc", "val_acc", "textured_acc", "shape_only_acc", "shape_bias")
RUN_FILES = ("config.yaml", "seed.txt", "env.json", "metrics.jsonl", "summary.json", "state.pt")


def run_status(path: Path) -> str:
    for name in RUN_FILES:
        if (path / name).exists() and not (path / name).is_file():
            return f"broken ({name} is not a file)"
    summary = read_json(path / "summary.json")
    if summary and summary.get("status") == "finished":
        return "finished"
    if (path / "summary.json").exists():
        return "broken (unreadable summary.json)"
    if not (path / "config.yaml").exists() or not (path / "seed.txt").exists():
        return "broken (no config.yaml or seed.txt)"
    return "unfinished (resumable)" if has_state(path) else "unfinished (no saved state)"


def run_row(path: Path, name: Optional[str] = None) -> dict[str, Any]:
    """The table row of one run directory; a directory that cannot be read is a row saying so."""
    name = name or path.name
    try:
        return _read_row(path, name)
    except (OSError, ValueError) as err:  # ValueError: text that is not UTF-8
        return {"name": name, "status": f"broken (unreadable: {err.__class__.__name__})"}


def _read_row(path: Path, name: str) -> dict[str, Any]:
    summary = read_json(path / "summary.json") or {}
    seed_file = path / "seed.txt"
    seed: Optional[str] = seed_file.read_text().strip() if seed_file.is_file() else None
    row = {"name": name, "stage": summary.get("stage", "?"), "seed": seed or "?", "status": run_status(path),
           "duration_s": summary.get("duration_s", "")}
    if not sub_runs(path):  # a sweep's figures are its sub-runs' rows
        row.update(_key_metrics(path, summary))
    replay = read_json(path / "replay.json")
    if replay is not None:
        row["replay"] = "matches" if replay.get("matches") else "differs"
    return row


def sub_run_row(path: Path, name: str) -> dict[str, Any]:
    """The row of one sub-run of a sweep: its status and figures (stage and seed are its run's)."""
    try:
        summary = read_json(path / "summary.json") or {}
        finished = summary.get("status") == "finished"
        status = "finished" if finished else "unfinished (resumable)" if has_state(path) else "unfinished"
        return {"name": name, "stage": "", "seed": "", "status": status, **_key_metrics(path, summary)}
    except (OSError, ValueError) as err:
        return {"name": name, "status": f"broken (unreadable: {err.__class__.__name__})"}


def _key_metrics(path: Path, summary: dict[str, Any]) -> dict[str, Any]:
    """KEY_METRICS from the summary, or while unfinished from the latest evaluation."""
    source = summary if "test_acc" in summary else (read_metrics(path) or [{}])[-1]
    return {k: source[k] for k in KEY_METRICS if isinstance(source.get(k), (int, float))}


def find_runs(folder: Path, _seen: Optional[set] = None) -> list[Path]:
    """Run directories at any depth below ``folder`` (not descending into a run directory). A symbolic link that
    loops (to itself, or to a folder above it) is skipped with a line on stderr, not silently."""
    seen = set() if _seen is None else _seen
    try:
        real = folder.resolve(strict=True)
    except (OSError, RuntimeError):  # RuntimeError: Python < 3.13 reports a symlink loop so
        print(f"skipped {folder}: a symbolic link loop", file=sys.stderr)
        return []
    if real in seen:
        print(f"skipped {folder}: a symbolic link to a folder already listed (a loop)", file=sys.stderr)
        return []
    seen.add(real)
    if is_run_dir(folder):
        return [folder]
    try:
        children = sorted(p for p in folder.iterdir() if (p.is_dir() or p.is_symlink()) and not p.name.startswith("."))
    except OSError:
        return []
    return [run for child in children for run in find_runs(child, seen)]


def is_run_dir(path: Path) -> bool:
    """A directory holding any file of the run-directory contract; one that cannot be read is listed (as broken)."""
    try:
        return path.is_dir() and any((path / f).exists() for f in RUN_FILES)
    except OSError:
        return True


# ---------------------------------------------------------------------------------------------------------------
# Sweeps: one row per point (per result row of a point), and the mean, spread and count over seeds

SWEEP_SEED_KEYS = ("reproducibility.random_seed", "reproducibility.reproduce")
# what tells a stage's result rows apart (transfer: condition and n; guide: condition; align: rule, width, data limit;
# stitch: the layer pair and the variant: front / end model alone, the stitch before / after training, least squares)
RESULT_ID_KEYS = ("condition", "n_disambiguation", "rule", "width", "data_limit", "front_layer", "end_layer",
                  "variant")
NOT_METRICS = {"seed", "duration_s", "steps", "best_epoch", "epoch", "step", "lr", "n_disambiguation"}


def sweep_rows(sweep_dir: str | Path) -> tuple[list[dict[str, Any]], list[str]]:
    """One row per finished point, or per result row of a point whose stage reports several (a transfer's
    conditions and n, a guide's conditions); unfinished points get a row with their state and error.

    Args:
        sweep_dir: a sweep directory (holding sweep.json).
    Returns:
        (rows, condition keys): the rows carry ``point``, ``state``, ``seed``, the point's values of the keys that
        vary over the sweep, the result's identifying keys and its numeric metrics; the condition keys are the
        varying keys but the seed, then the identifying keys.
    Raises:
        UserError: no readable sweep.json.
    """
    from .errors import UserError

    sweep_dir = Path(sweep_dir)
    record = read_json(sweep_dir / "sweep.json")
    if record is None or not isinstance(record.get("points"), list):
        raise UserError(f"{sweep_dir}: no readable sweep.json (not a sweep directory)")
    points = record["points"]
    varying = _varying_keys(points)
    rows: list[dict[str, Any]] = []
    for point in points:
        run_dir = sweep_dir / point["name"]
        outcome = read_json(sweep_dir / "points" / f"{point['name']}.json") or {}
        status = run_status(run_dir) if run_dir.is_dir() else "pending"
        state = "finished" if status == "finished" else outcome.get("state") or status
        base = {"point": point["name"], "state": state,
                **{k: _point_value(point, k) for k in varying if k not in SWEEP_SEED_KEYS}}
        summary = read_json(run_dir / "summary.json") or {}
        base["seed"] = summary.get("seed", point["values"].get("reproducibility.random_seed", ""))
        if state != "finished":
            rows.append({**base, "error": outcome.get("error") or ""})
            continue
        results = summary.get("results")
        for result in results if isinstance(results, list) and results else [summary]:
            ids = {k: result[k] for k in RESULT_ID_KEYS if result.get(k) is not None}
            metrics = {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                       and k not in NOT_METRICS and k not in ids and not k.startswith("time_")}
            rows.append({**base, **ids, **metrics})
    id_keys = [k for k in RESULT_ID_KEYS if any(k in r for r in rows)]
    return rows, [k for k in varying if k not in SWEEP_SEED_KEYS] + id_keys


def _point_value(point: dict[str, Any], key: str) -> Any:
    return point.get(key) if key in ("config", "stage") else point["values"].get(key, "")


def _varying_keys(points: list[dict[str, Any]]) -> list[str]:
    """The keys whose value is not the same at every point (config and stage too, for a sweep of many configs)."""
    keys = [k for k in ("config", "stage") if len({str(p.get(k)) for p in points}) > 1]
    for point in points:
        keys += [k for k in point["values"] if k not in keys]
    return [k for k in keys if len({repr(_point_value(p, k)) for p in points}) > 1]


def aggregate(rows: list[dict[str, Any]], keys: list[str], metrics: list[str]) -> list[dict[str, Any]]:
    """Finished rows grouped by ``keys`` (every condition key but the seed): each metric's mean, sample standard
    deviation (blank for a single value) and count, in the order the groups first appear."""
    import statistics

    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        if row.get("state") == "finished":
            members = groups.setdefault(tuple(repr(row.get(k, "")) for k in keys), [])
            if row.get("seed") in ("", None) or all(m.get("seed") != row["seed"] for m in members):
                members.append(row)  # a seed counts once (a sweep recorded before duplicates were refused)
    table = []
    for members in groups.values():
        out = {k: members[0].get(k, "") for k in keys}
        for metric in metrics:
            values = [r[metric] for r in members if isinstance(r.get(metric), (int, float))]
            out[f"{metric} mean"] = statistics.fmean(values) if values else ""
            out[f"{metric} std"] = statistics.stdev(values) if len(values) > 1 else ""
            out[f"{metric} n"] = len(values)
        table.append(out)
    return table


def plot_sweep(path: str | Path, rows: list[dict[str, Any]], keys: list[str], metric: str, x: Optional[str]
               ) -> Optional[Path]:
    """``metric`` (mean +- standard deviation over seeds) against the key ``x``, one line per condition (the other
    keys); with no numeric ``x``, one bar per condition. None when no finished row has the metric."""
    rows = [r for r in rows if r.get("state") == "finished" and isinstance(r.get(metric), (int, float))]
    if not rows:
        return None
    numeric_x = x is not None and all(isinstance(r.get(x), (int, float)) for r in rows)
    others = [k for k in keys if k != x]
    table = aggregate(rows, ([x] if x else []) + others, [metric])
    label = lambda row: ", ".join(_key_value(k, row[k]) for k in others) or describe(metric)  # noqa: E731
    seeds = _seeds_said(n for row in table for n in [row[f"{metric} n"]])
    if numeric_x:
        series: dict[str, list[tuple[float, ...]]] = {}
        for row in table:
            series.setdefault(label(row), []).append(
                (row[x], row[f"{metric} mean"], row[f"{metric} std"] or 0.0))
        return plot_lines(path, series, title=f"{describe(metric)} against {_key_words(x)} ({seeds})",
                          xlabel=_key_words(x), ylabel=describe(metric), logx=x == "n_disambiguation")
    groups: dict[str, list[float]] = {}
    for row in rows:
        name = (_key_value(x, row.get(x)) + ", " if x else "") + label(row)
        groups.setdefault(name, []).append(row[metric])
    return plot_points(path, groups, title=f"{describe(metric)} per condition ({seeds})", ylabel=describe(metric))


def _key_words(key: str) -> str:
    """A sweep key in words: its last part (``guidance.condition`` -> "condition")."""
    return describe(key.rsplit(".", 1)[-1])


def _key_value(key: str, value: Any) -> str:
    return f"{_key_words(key)}: {describe(str(value))}"


def _seeds_said(counts) -> str:
    """How many seeds each mean stands on, in words: "one seed", "mean +- sd over 3 seeds", "2 to 3 seeds"."""
    counts = sorted(set(counts))
    if counts == [1]:
        return "one seed: no spread shown"
    seeds = f"{counts[0]} seeds" if len(counts) == 1 else f"{counts[0]} to {counts[-1]} seeds"
    return f"mean +- sd over {seeds}, each seed a dot"


def sweep_report(root: Path, metrics: list[str], x: Optional[str]) -> int:
    """Print a sweep's per-point and grouped tables; write them as CSV and the plot into ``<sweep>/report/``."""
    rows, keys = sweep_rows(root)
    numeric = list(dict.fromkeys(k for r in rows for k, v in r.items() if isinstance(v, (int, float))
                                 and k not in keys and k != "seed"))
    chosen = metrics or [m for m in KEY_METRICS if m in numeric] or numeric[:3]
    unknown = [m for m in chosen if m not in numeric]
    if unknown and any(r.get("state") == "finished" for r in rows):
        raise _user_error(f"--metric {unknown[0]!r}: no point reports it; reported: {', '.join(numeric)}")
    if x is not None and x not in keys:
        raise _user_error(f"--x {x!r}: not a key of this sweep; keys: {', '.join(keys) or 'none'}")
    shown = ["point", "state", "seed", *keys, *chosen, "error"]
    print(format_table([{k: r.get(k, "") for k in shown if any(k in q for q in rows)} for r in rows]))
    groups = aggregate(rows, keys, chosen)
    if groups:
        print(f"\nmean, standard deviation and count over seeds, by {', '.join(keys) or 'nothing (one group)'}:")
        print(format_table(groups))
    out = root / "report"
    out.mkdir(exist_ok=True)
    _write_csv(out / "points.csv", rows)
    _write_csv(out / "groups.csv", aggregate(rows, keys, numeric))
    x = x or next((k for k in ("n_disambiguation", *keys) if k in keys and
                   all(isinstance(r.get(k), (int, float)) for r in rows if r.get("state") == "finished")), None)
    import_builtins()  # every system's entries registered: condition names are shown in their words
    for metric in chosen:
        written = plot_sweep(out / f"{metric.replace('/', '_')}_vs_{x or 'condition'}.png", rows, keys, metric, x)
        if written:
            print(f"wrote {written}")
    print(f"wrote {out / 'points.csv'} and {out / 'groups.csv'}")
    return 0


def _user_error(message: str):
    from .errors import UserError

    return UserError(message)


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    from .files import atomic_write_csv

    atomic_write_csv(path, rows)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m instill.report", description=__doc__.splitlines()[0])
    parser.add_argument("root", nargs="?", default="checkpoints", help="a run directory or a folder of them")
    parser.add_argument("--plot", action="store_true",
                        help="write each run's training curves into --plot-dir (never into the runs)")
    parser.add_argument("--plot-dir", default="reports/curves", help="the folder of --plot (default reports/curves)")
    parser.add_argument("--metric", action="append", default=[],
                        help="a sweep: the metric to aggregate and plot (repeatable; default: the key metrics)")
    parser.add_argument("--x", help="a sweep: the key to plot the metric against (default: n, or the first "
                                    "numeric key); one line per condition")
    args = parser.parse_args(argv)
    root = Path(args.root)
    if not root.is_dir():
        print(f"error: {root} is not a directory", file=sys.stderr)
        return 2
    if (root / "sweep.json").exists():
        from .errors import UserError

        try:
            return sweep_report(root, args.metric, args.x)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            return err.exit_code
    runs = find_runs(root)
    if not runs:
        print(f"no run directories in {root}")
        return 0
    rows = []
    for path in runs:
        name = path.name if path == root else str(path.relative_to(root))
        rows.append(run_row(path, name))
        try:
            rows += [sub_run_row(sub, f"{name}/{sub.name}") for sub in sub_runs(path)]
        except OSError:  # an unreadable run directory: its row already says so
            pass
    print(format_table(rows))
    if args.plot:
        from .errors import UserError

        import_builtins()  # every system's entries registered: condition names are shown in their words
        try:
            make_directory(args.plot_dir)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            return err.exit_code
        for path in runs:
            name = path.name if path == root else str(path.relative_to(root))
            try:
                written = plot_runs(path, Path(args.plot_dir), name)
            except Exception as err:  # one bad run must not stop the others' plots
                print(f"{path.name}: no plot ({err.__class__.__name__}: {err})", file=sys.stderr)
                continue
            for figure in written:
                print(f"wrote {figure}")
    return 0

