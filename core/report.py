"""Tables and plots over run directories.

    python -m instill.report checkpoints/           one row per run: name, stage, seed, status, duration, key metrics
    python -m instill.report checkpoints/ --plot    also plot each run's curves into reports/curves/ (--plot-dir)
    python -m instill.report SWEEP_DIR [--metric M] [--x KEY]
                                                    a sweep: one row per point, then mean, std and count over
                                                    seeds per condition; CSVs and M-against-KEY plots in report/

Run directories are found at any depth below the folder; a sweep's sub-runs (one per condition, n, lr) follow their
run as ``run/sub-run`` rows with their own figures. Broken or unfinished run directories are listed as such; the
report never crashes on them.
"""

from __future__ import annotations

if __name__ == "__main__":  # python -m instill.report: nothing below runs in this copy
    from instill.errors import run_module

    run_module("instill.report")

import argparse
import sys
from pathlib import Path
from typing import Any, Optional

from .files import atomic_save, make_directory, read_json
from .run import has_state, read_metrics

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


def sub_runs(path: Path) -> list[Path]:
    """The sub-run directories of a sweep (each holds its own metrics, state or summary)."""
    return sorted(p for p in path.iterdir() if p.is_dir() and any(
        (p / f).is_file() for f in ("summary.json", "state.pt", "metrics.jsonl")))


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


def format_table(rows: list[dict[str, Any]]) -> str:
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    cells = [[_fmt(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


# Words for the names a figure shows: condition names, and the prefixes / suffixes of metric keys.
CONDITION_WORDS = {
    "subnet": "subnetwork (frozen)", "subnet_trainable": "subnetwork (trainable)", "full_model": "whole base model",
    "random_init": "random initialisation", "sampled_subnet": "random subnetwork, same size",
    "sampled_complement": "random weights outside the subnetwork", "unguided": "no guidance",
    "guided_untrained": "guided by an untrained guide", "guided_trained": "guided by a trained guide",
}
_SPLIT_WORDS = {"train": "training", "val": "validation", "test": "test", "textured": "textured",
                "shape_only": "shape-only", "cue_conflict": "cue-conflict",
                "cue_conflict_texture": "cue-conflict (scored by texture)"}
_METRIC_WORDS = {"acc": "accuracy", "loss": "loss", "shape_bias": "shape bias", "task_loss": "task loss",
                 "align_loss": "alignment loss", "l0_penalty": "L0 penalty"}
DPI = 150


def describe(key: str) -> str:
    """A metric key or condition name in words: ``val_acc`` -> "validation accuracy", ``subnet`` -> "subnetwork
    (frozen)"; unknown names come back with spaces for underscores."""
    if key in CONDITION_WORDS:
        return CONDITION_WORDS[key]
    if key in _METRIC_WORDS:
        return _METRIC_WORDS[key]
    for split, words in sorted(_SPLIT_WORDS.items(), key=lambda item: -len(item[0])):
        for metric, metric_words in _METRIC_WORDS.items():
            if key == f"{split}_{metric}":
                return f"{words} {metric_words}"
    return key.replace("_", " ")


def _honest_ylim(ax, values: list[float], fraction: bool) -> None:
    """A y-axis that shows differences at their size: fractions on [0, 1]; otherwise at least 10% of the values'
    magnitude, so that a difference of 0.001 does not fill the figure."""
    finite = [v for v in values if isinstance(v, (int, float)) and v == v and abs(v) != float("inf")]
    if fraction:
        ax.set_ylim(0, 1.02)
        return
    if not finite:
        return
    low, high = min(finite), max(finite)
    least = 0.1 * max(abs(low), abs(high)) or 0.1
    if high - low < least:
        middle = (high + low) / 2
        low, high = middle - least / 2, middle + least / 2
    if min(finite) >= 0:
        low = max(low, 0.0)
    margin = 0.05 * (high - low)
    ax.set_ylim(low - margin if low > 0 else low, high + margin)


def _wrapped(title: str, width_in: float, fontsize: float) -> str:
    """``title`` broken into lines that fit ``width_in`` inches at ``fontsize`` points (a title wider than its
    figure is cut off at both sides)."""
    import textwrap

    return "\n".join(textwrap.wrap(title, max(20, int(width_in * 72 / (fontsize * 0.6))))) if title else title


def _wants_log(values: list[Any], fraction: bool) -> bool:
    """A log y-axis for positive values spanning more than a factor of 30 (a first validation loss of 250 beside
    losses below 1); fractions stay linear."""
    finite = [v for v in values if isinstance(v, (int, float)) and v == v and abs(v) != float("inf")]
    return not fraction and bool(finite) and min(finite) > 0 and max(finite) / min(finite) > 30


def _is_fraction(keys: list[str]) -> bool:
    return bool(keys) and all(k.endswith(("_acc", "shape_bias")) or k in ("density",) for k in keys)


def plot_run(path: str | Path, out: Optional[Path] = None) -> Optional[Path]:
    """curves.png (or ``out``): the losses and accuracies logged at each evaluation against the optimizer step;
    None when nothing was logged. A sweep (a run with sub-runs) has no curve of its own: see ``plot_runs``."""
    path = Path(path)
    rows = read_metrics(path)
    if not rows:
        return None
    plt = _pyplot()
    steps = [r.get("step", i) for i, r in enumerate(rows)]
    numbers = [k for k in rows[-1] if isinstance(rows[-1][k], (int, float)) and "/" not in k]
    panels = [([k for k in numbers if k.endswith("loss")], "loss (cross-entropy, nats)", False),
              ([k for k in numbers if k.endswith("_acc")], "accuracy (fraction correct)", True)]
    if "shape_bias" in numbers:  # over training, as the accuracies
        panels.append((["shape_bias"], "shape bias (fraction of shape decisions)", True))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.6), squeeze=False)
    for ax, (keys, label, fraction) in zip(axes[0], panels):
        values = [r.get(k) for r in rows for k in keys]
        for key in keys:
            ax.plot(steps, [r.get(key, float("nan")) for r in rows], marker=".", label=describe(key))
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(label + (" (log scale)" if _wants_log(values, fraction) else ""))
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=9)
        if _wants_log(values, fraction):  # one huge first loss would flatten every other point on a linear axis
            ax.set_yscale("log")
        else:
            _honest_ylim(ax, values, fraction)
        if keys:  # below the axes: inside, a legend covers lines
            ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.17), ncol=2, frameon=False)
    sub_run = (path.parent / "config.yaml").is_file()  # a sweep's condition: say whose
    fig.suptitle(f"{path.parent.name} / {path.name}" if sub_run else path.name)
    fig.tight_layout()
    out = path / "curves.png" if out is None else out
    _save_figure(fig, out)
    return out


def plot_runs(path: str | Path, out: Optional[Path] = None, name: str = "") -> list[Path]:
    """curves.png for a run, or for each sub-run of a sweep (whose own metrics are one row per condition, not a
    training curve); into ``out`` (a folder, as ``<name>[--<sub-run>]-curves.png``) instead of the runs."""
    path = Path(path)
    subs = sub_runs(path)

    def target(sub: Optional[Path]) -> Optional[Path]:
        if out is None:
            return None
        return out / ("--".join([name.replace("/", "--"), *([sub.name] if sub else [])]) + "-curves.png")

    written = [plot_run(sub, target(sub)) for sub in subs] if subs else [plot_run(path, target(None))]
    return [p for p in written if p is not None]


def plot_bars(path: str | Path, values: dict[str, Any], *, title: str, ylabel: str,
              fraction: Optional[bool] = None, spread: Optional[dict[str, Any]] = None,
              points: Optional[dict[str, Any]] = None) -> Optional[Path]:
    """A bar chart of named values (mask density per layer, ...), or grouped bars of several series given as
    ``{series: {name: value}}`` (accuracy and shape bias per condition, ...). Names and series are shown in words
    (``describe``); ``fraction`` (default: every value in [0, 1]) puts the y-axis on [0, 1]. ``spread`` (shaped as
    ``values``) adds an error bar of +- spread to each bar; ``points`` (``{series: {name: [value, ...]}}``) a dot
    per value over its bar (the single draws behind a mean)."""
    if not values:
        return None
    grouped = all(isinstance(v, dict) for v in values.values())
    series = values if grouped else {"": values}
    names = list(dict.fromkeys(name for bars in series.values() for name in bars))
    heights = [v for bars in series.values() for v in bars.values()]
    if fraction is None:
        fraction = all(isinstance(v, (int, float)) and 0 <= v <= 1 for v in heights)
    plt = _pyplot()
    width = 0.8 / len(series)
    labels = [describe(name) for name in names]
    long_labels = max(len(label) for label in labels) > 12 or len(names) > 8
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(names) * len(series) + 2.5), 4.6 if long_labels else 4))
    spreads = (spread if grouped else {"": spread}) if spread else {}
    dots = (points if grouped else {"": points}) if points else {}
    for i, (label, bars) in enumerate(series.items()):
        offsets = [k + (i - (len(series) - 1) / 2) * width for k in range(len(names))]
        errors = [spreads.get(label, {}).get(name, 0.0) for name in names] if spreads else None
        ax.bar(offsets, [bars.get(name, float("nan")) for name in names], width, yerr=errors, capsize=3,
               label=describe(label) if label else None)
        for offset, name in zip(offsets, names):
            values_here = dots.get(label, {}).get(name, [])
            ax.plot([offset] * len(values_here), values_here, "o", markersize=3, color="black", alpha=0.6,
                    zorder=3, label=None)
            heights += list(values_here)
    ax.set_xticks(range(len(names)), labels, rotation=30 if long_labels else 0, ha="right" if long_labels else "center",
                  fontsize=9)
    ax.set_ylabel(ylabel)
    ax.set_title(_wrapped(title, fig.get_figwidth() * 0.75, 10), fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    _honest_ylim(ax, heights + [0.0], fraction)
    if grouped:  # beside the axes: over the bars it would hide the tallest
        ax.legend(fontsize=9, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    _save_figure(fig, path)
    return Path(path)


def plot_lines(path: str | Path, series: dict[str, list[tuple[float, ...]]], *, title: str, xlabel: str,
               ylabel: str, logx: bool = False, fraction: bool = False,
               styles: Optional[dict[str, dict[str, Any]]] = None) -> Optional[Path]:
    """One line per named series of (x, y) points (accuracy against n per condition, ...), named in words in the
    legend; a point given as (x, y, spread) gets an error bar of +- spread; ``fraction`` puts the y-axis on [0, 1];
    ``styles`` gives a series' matplotlib line keywords (color, linestyle, ...)."""
    if not series:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for label, points in series.items():
        points = sorted(points)
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        spreads = [p[2] if len(p) > 2 else 0.0 for p in points]
        style = {"marker": "o", "label": describe(label), **(styles or {}).get(label, {})}
        if any(spreads):
            ax.errorbar(xs, ys, yerr=spreads, capsize=3, **style)
        else:
            ax.plot(xs, ys, **style)
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(_wrapped(title, fig.get_figwidth() * 0.85, 10), fontsize=10)
    ax.grid(alpha=0.3)
    ax.tick_params(labelsize=9)
    _honest_ylim(ax, [p[1] for points in series.values() for p in points], fraction)
    ax.legend(fontsize=9)
    fig.tight_layout()
    _save_figure(fig, path)
    return Path(path)


def _draw_heatmap(fig, ax, values, rows: list[str], cols: list[str], *, title: str, xlabel: str, ylabel: str,
                  annotate: Optional[bool], limits: Optional[tuple[float, float]]) -> None:
    import numpy as np

    values = np.asarray(values, dtype=float)
    annotate = values.shape[0] <= 16 and values.shape[1] <= 16 if annotate is None else annotate
    vmin, vmax = limits if limits is not None else (None, None)
    image = ax.imshow(np.ma.masked_invalid(values), cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto")
    fig.colorbar(image, ax=ax)
    ax.set_xticks(range(len(cols)), cols, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(_wrapped(title, ax.get_position().width * fig.get_figwidth(), 9), fontsize=9)
    if annotate:
        for (i, j), value in np.ndenumerate(values):
            if np.isfinite(value):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=6,
                        color=readable_on(image.cmap(image.norm(value))))


def luminance(rgb) -> float:
    """The relative luminance (WCAG 2) of an sRGB colour given as fractions."""
    def linear(c: float) -> float:
        return c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (linear(float(c)) for c in rgb[:3])
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def contrast(a, b) -> float:
    """The WCAG contrast ratio of two colours (1 to 21; text needs at least 4.5)."""
    high, low = sorted((luminance(a), luminance(b)), reverse=True)
    return (high + 0.05) / (low + 0.05)


def readable_on(cell) -> str:
    """Black or white, whichever contrasts more with a cell of colour ``cell`` (at least 4.58 on any colour)."""
    return "black" if contrast(cell, (0, 0, 0)) >= contrast(cell, (1, 1, 1)) else "white"


def plot_heatmap(values, rows: list[str], cols: list[str], *, path: str | Path | None = None, title: str = "",
                 xlabel: str = "", ylabel: str = "", annotate: Optional[bool] = None,
                 limits: Optional[tuple[float, float]] = None):
    """A matrix (rows x cols, NaN cells left blank) with its row and column names on the axes; written to ``path``
    when given. ``annotate``: print each value in its cell (default: when there are at most 16 x 16 cells).
    Returns the matplotlib figure (closed once saved to ``path``)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4.5, 0.55 * len(cols) + 2.5), max(3.5, 0.45 * len(rows) + 2)))
    _draw_heatmap(fig, ax, values, rows, cols, title=title, xlabel=xlabel, ylabel=ylabel, annotate=annotate,
                  limits=limits)
    fig.tight_layout()
    if path is not None:
        _save_figure(fig, path)
    return fig


def _save_figure(fig, path: str | Path) -> None:
    """Write a PNG atomically (a kill leaves the old plot or the new one) and close the figure."""
    try:
        atomic_save(path, lambda tmp: fig.savefig(tmp, dpi=DPI, format="png"))
    finally:
        _pyplot().close(fig)


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


def plot_points(path: str | Path, groups: dict[str, list[float]], *, title: str, ylabel: str) -> Optional[Path]:
    """Each group's values as dots (every seed), with their mean and +- one sample standard deviation; the y-axis
    spans the values (a small difference is not flattened against a zero the values are nowhere near)."""
    import statistics

    if not groups:
        return None
    plt = _pyplot()
    names = list(groups)
    long_labels = max(len(n) for n in names) > 14 or len(names) > 6
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(names) + 2.5), 4.8 if long_labels else 4.2))
    for k, name in enumerate(names):
        values = groups[name]
        jitter = [k + 0.08 * (i - (len(values) - 1) / 2) for i in range(len(values))]
        ax.scatter(jitter, values, s=14, color="0.55", zorder=2, label="one seed" if k == 0 else None)
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        ax.errorbar([k + 0.3], [statistics.fmean(values)], yerr=[spread] if spread else None, fmt="o", color="C0",
                    capsize=4, zorder=3, label="mean +- sd" if k == 0 and len(values) > 1 else None)
    ax.set_xticks(range(len(names)), names, rotation=25 if long_labels else 0,
                  ha="right" if long_labels else "center", fontsize=9)
    ax.set_xlim(-0.6, len(names) - 0.3)
    ax.set_ylabel(ylabel)
    ax.set_title(_wrapped(title, fig.get_figwidth() * 0.85, 10), fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    _honest_ylim(ax, [v for values in groups.values() for v in values], False)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    _save_figure(fig, path)
    return Path(path)


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
def plot_heatmaps(path: str | Path, matrices: dict[str, Any], *, rows: list[str], cols: list[str], xlabel: str = "",
                  ylabel: str = "", limits: Optional[tuple[float, float]] = (0.0, 1.0)) -> Optional[Path]:
    """Several matrices over the same rows and columns side by side, one heatmap per title (the stitched accuracy
    of every layer pair beside the CKA of the same layers, say)."""
    if not matrices:
        return None
    plt = _pyplot()
    width = max(4.5, 0.55 * len(cols) + 2.5)
    fig, axes = plt.subplots(1, len(matrices), figsize=(width * len(matrices), max(3.5, 0.45 * len(rows) + 2)),
                             squeeze=False)
    for ax, (title, values) in zip(axes[0], matrices.items()):
        _draw_heatmap(fig, ax, values, rows, cols, title=title, xlabel=xlabel, ylabel=ylabel, annotate=None,
                      limits=limits)
    fig.tight_layout()
    _save_figure(fig, path)
    return Path(path)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


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
