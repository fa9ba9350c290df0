"""The figures and tables the stages and tools write: every plotting primitive in one place, so that each figure
of the project keeps the same conventions (names in words, honest y-axes, text inside the canvas, 150 dpi, atomic
writes).

- ``plot_run`` / ``plot_runs``: a run's (or each sub-run's) training curves, ``curves.png``;
- ``plot_bars``, ``plot_lines``, ``plot_points``, ``plot_heatmap``, ``plot_heatmaps``: the figure kinds the stages
  draw from their results;
- ``format_table``: the plain-text tables printed after a run;
- ``describe``: a metric key or condition name in words.

``instill.report`` (``python -m instill.report``) is the tool that reads run directories and uses these.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from .files import atomic_save
from .registry import label_of
from .run import read_metrics, sub_runs


def format_table(rows: list[dict[str, Any]]) -> str:
    """``rows`` as a plain-text table: every key a column, in the order first seen; floats to 4 places."""
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


# Words for the prefixes / suffixes of metric keys (a registered entry's name, such as a condition, gives its own:
# ``register(label=...)``).
_SPLIT_WORDS = {"train": "training", "val": "validation", "test": "test", "textured": "textured",
                "shape_only": "shape-only", "cue_conflict": "cue-conflict",
                "cue_conflict_texture": "cue-conflict (scored by texture)"}
_METRIC_WORDS = {"acc": "accuracy", "loss": "loss", "shape_bias": "shape bias", "task_loss": "task loss",
                 "align_loss": "alignment loss", "l0_penalty": "L0 penalty"}
DPI = 150


def describe(key: str) -> str:
    """A metric key or registered name in words: ``val_acc`` -> "validation accuracy", ``subnet`` -> "subnetwork
    (frozen)" (the ``label`` its registration gives); unknown names come back with spaces for underscores."""
    if (label := label_of(key)) is not None:
        return label
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


def _save_figure(fig, path: str | Path) -> None:
    """Write a PNG atomically (a kill leaves the old plot or the new one) and close the figure."""
    try:
        atomic_save(path, lambda tmp: fig.savefig(tmp, dpi=DPI, format="png"))
    finally:
        _pyplot().close(fig)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
