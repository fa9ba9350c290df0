"""Figures a researcher would show: sweeps plotted per sub-run, names in words, honest y-axes, 150 dpi."""

from __future__ import annotations

from pathlib import Path

import pytest

from instill.report import _honest_ylim, describe, main as report_main
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
    assert describe("val_acc") == "validation accuracy"
    assert describe("shape_only_acc") == "shape-only accuracy"
    assert describe("sampled_subnet") == "random subnetwork, same size"
    assert describe("guided_untrained") == "guided by an untrained guide"


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
