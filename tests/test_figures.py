"""Figures a researcher would show: sweeps plotted per sub-run, names in words, honest y-axes, 150 dpi."""

from __future__ import annotations

from pathlib import Path

import pytest

from instill.plots import _honest_ylim, describe
from instill.report import main as report_main
from tests.conftest import run_cli


class Axis:
    def set_ylim(self, low, high):
        self.limits = (low, high)


@pytest.mark.parametrize("values, fraction, expected", [
    ([0.951, 0.952], True, (0, 1.02)),  # accuracies: the whole unit interval
    ([2.001, 2.002], False, (1.89, 2.11)),  # a 0.001 difference on values near 2 stays small
    ([0.0, 5.0], False, (0.0, 5.25)),
])
def test_y_axes_do_not_exaggerate_tiny_differences(values, fraction, expected):
    axis = Axis()
    _honest_ylim(axis, values, fraction)
    assert axis.limits == pytest.approx(expected, abs=0.011)


def test_names_are_shown_in_words():
    from instill.registry import Registry, import_builtins

    import_builtins()  # as a stage (its own system) or the report tool (every system) has
    assert describe("val_acc") == "validation accuracy"
    assert describe("shape_only_acc") == "shape-only accuracy"
    assert describe("sampled_subnet") == "random subnetwork, same size"  # the words its registration gives
    assert describe("guided_untrained") == "guided by an untrained guide"
    assert describe("my_condition") == "my condition"
    Registry("toy condition").register("my_condition", label="mine, in words")(lambda ctx: None)
    assert describe("my_condition") == "mine, in words"  # a condition of your own, the same way


def test_a_sweep_plots_each_condition_not_its_summary_rows(workdir, capsys):
    from PIL import Image

    assert run_cli("guide", "configs/tiny_guide_digits.yaml") == 0
    run = Path("checkpoints/tiny_guide_digits")
    subs = sorted(p for p in run.iterdir() if (p / "metrics.jsonl").is_file())
    assert subs and all((sub / "curves.png").is_file() for sub in subs)  # written by the stage itself
    for sub in subs:
        (sub / "curves.png").unlink()
    assert report_main([str(run.parent), "--plot"]) == 0  # into reports/curves/: a finished run is never touched
    assert not any((sub / "curves.png").exists() for sub in subs) and not (run / "curves.png").exists()
    plots = [Path(f"reports/curves/tiny_guide_digits--{sub.name}-curves.png") for sub in subs]
    assert all(p.is_file() for p in plots)
    dpi = Image.open(plots[0]).info["dpi"]
    assert dpi == pytest.approx((150, 150), abs=0.5)


# ---------------------------------------------------------------------------------------------------------------
# Every kind of figure the project writes, at its default size: no text outside the canvas, annotations readable


def _check_figure(fig) -> None:
    """Every visible text lies inside the canvas; every number printed on a heatmap cell contrasts with it."""
    from matplotlib.colors import to_rgb

    from instill.plots import contrast

    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    drawn = fig.get_tightbbox(renderer)  # inches: every drawn artist, titles, tick labels and legends included
    width, height = fig.get_size_inches()
    tolerance = 1 / fig.dpi
    assert (drawn.x0 >= -tolerance and drawn.y0 >= -tolerance and drawn.x1 <= width + tolerance
            and drawn.y1 <= height + tolerance), f"text falls outside the {width} x {height} in canvas: {drawn}"
    for ax in fig.axes:
        for image in ax.images:
            cells = image.get_array()
            for note in ax.texts:
                j, i = (round(c) for c in note.get_position())
                cell = image.cmap(image.norm(cells[i, j]))
                assert contrast(to_rgb(note.get_color()), cell) >= 4.5, (note.get_text(), note.get_color(), cell)


@pytest.fixture
def checked_figures(monkeypatch, tmp_path):
    """Every figure a plotting function saves is checked first; returns the list of checked paths."""
    from instill import plots

    checked, save = [], plots._save_figure

    def check_then_save(fig, path):
        _check_figure(fig)
        checked.append(Path(path))
        save(fig, path)

    monkeypatch.setattr(plots, "_save_figure", check_then_save)
    return checked


def _write_metrics(folder: Path, rows: list[dict]) -> None:
    import json

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_every_figure_kind_keeps_its_text_inside_the_canvas_and_readable(tmp_path, checked_figures):
    import numpy as np

    from instill import plots, report

    # curves.png of a transfer condition: a first validation loss of 250, cue-conflict metrics, shape bias
    rows = [{"epoch": e, "step": 100 * e, "train_loss": 2.0 / e, "val_loss": 250.0 if e == 1 else 0.5 / e,
             "val_acc": 0.5 + 0.1 * e, "textured_acc": 0.6 + 0.1 * e, "shape_only_acc": 0.3 + 0.05 * e,
             "cue_conflict_acc": 0.2 + 0.05 * e, "cue_conflict_texture_acc": 0.6 - 0.05 * e,
             "shape_bias": 0.2 + 0.1 * e, "lr": 0.001} for e in range(1, 5)]
    _write_metrics(tmp_path / "fcn" / "random_init", rows)
    (tmp_path / "fcn" / "config.yaml").write_text("name: fcn\n")
    plots.plot_run(tmp_path / "fcn" / "random_init")
    conditions = ["subnet", "subnet_trainable", "full_model", "random_init", "sampled_subnet"]
    plots.plot_bars(tmp_path / "shape_bias.png",
                     {k: {c: 0.1 + 0.15 * i for i, c in enumerate(conditions)}
                      for k in ("textured_acc", "shape_only_acc", "shape_bias")},
                     title="test accuracy (textured, shape-only) and shape bias (cue-conflict) per condition; one "
                           "seed (a sweep over seeds reports mean and spread)",
                     ylabel="fraction (accuracy, or shape decisions)", fraction=True)
    plots.plot_bars(tmp_path / "mask_density.png", {f"layers.{i}.weight": 0.1 * i for i in range(1, 9)},
                     title="fraction of weights kept per layer", ylabel="density")
    plots.plot_lines(tmp_path / "accuracy_vs_n.png", {c: [(1, 0.5), (10, 0.6), (100, 0.7)] for c in conditions},
                      title="test accuracy against disambiguating examples", xlabel="disambiguating training examples "
                      "(log scale)", ylabel="test accuracy (fraction correct)", logx=True, fraction=True)
    layers = [f"layers.{i}.conv" for i in range(8)]
    values = np.linspace(0, 1, 64).reshape(8, 8)
    plots.plot_heatmap(values, layers, layers, path=tmp_path / "heatmap_cka_minibatch.png",
                        title="cka_minibatch: checkpoints/compare_digits_convnet_a (model A) against "
                              "checkpoints/compare_digits_convnet_b (model B)", xlabel="model B", ylabel="model A")
    plots.plot_heatmaps(tmp_path / "matrix.png", {"stitched accuracy relative to the end model (after training)":
                         values, "CKA between the front layer and the end layer it replaces": values[::-1]},
                         rows=layers, cols=layers, xlabel="end model layer", ylabel="front model layer")
    sweep_rows = [{"state": "finished", "guidance.condition": c, "test_acc": 6.71 + 0.07 * i + 0.01 * s}
                  for i, c in enumerate(["unguided", "guided_untrained", "guided_trained"]) for s in range(3)]
    report.plot_sweep(tmp_path / "test_acc_vs_condition.png", sweep_rows, ["guidance.condition"], "test_acc", None)
    assert [p.name for p in checked_figures] == [
        "curves.png", "shape_bias.png", "mask_density.png", "accuracy_vs_n.png", "heatmap_cka_minibatch.png",
        "matrix.png", "test_acc_vs_condition.png"]


def test_a_loss_axis_turns_logarithmic_when_one_value_dwarfs_the_others():
    from instill.plots import _wants_log

    assert _wants_log([250.0, 0.4, 0.3], fraction=False) and not _wants_log([2.0, 0.4], fraction=False)
    assert not _wants_log([0.001, 0.9], fraction=True)


def test_a_sweep_figure_says_how_many_seeds_and_spans_the_values(tmp_path, monkeypatch):
    from instill import plots, report

    titles, limits = [], []
    save = plots._save_figure

    def keep(fig, path):
        titles.append(fig.axes[0].get_title().replace("\n", " "))
        limits.append(fig.axes[0].get_ylim())
        save(fig, path)

    monkeypatch.setattr(plots, "_save_figure", keep)
    rows = [{"state": "finished", "guidance.condition": c, "test_acc": v} for c, v in
            (("unguided", 6.71), ("unguided", 6.75), ("guided_trained", 6.85), ("guided_trained", 6.83))]
    report.plot_sweep(tmp_path / "a.png", rows, ["guidance.condition"], "test_acc", None)
    report.plot_sweep(tmp_path / "b.png", rows[::2], ["guidance.condition"], "test_acc", None)
    assert titles[0] == "test accuracy per condition (mean +- sd over 2 seeds, each seed a dot)"
    assert titles[1] == "test accuracy per condition (one seed: no spread shown)"
    low, high = limits[0]
    assert 6.0 < low < 6.71 and 6.85 < high < 7.5  # not from zero: 6.71 against 6.85 shows
