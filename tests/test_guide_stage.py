"""End to end: guide.py conditions as sub-runs with one results table; bad input gives one line and exit 2."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from core.run import is_finished, read_metrics
from tests.conftest import run_cli


def test_guide_conditions_share_data_and_log_alignment(workdir):
    assert run_cli("guide", "configs/tiny_guide_digits.yaml") == 0
    root = Path("checkpoints/tiny_guide_digits")
    assert is_finished(root) and is_finished("checkpoints/tiny_digits")  # the trained guide ran first
    with open(root / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["condition"] for r in rows] == ["unguided", "guided_untrained", "guided_trained"]
    guided = read_metrics(root / "guided_untrained")
    assert {"task_loss", "align_loss"} <= set(guided[0])
    assert any(k.startswith("sim/") for k in guided[0])
    assert "align_loss" not in read_metrics(root / "unguided")[0]
    first_losses = {c: read_metrics(root / c)[0]["task_loss" if c != "unguided" else "train_loss"]
                    for c in ("unguided", "guided_untrained")}
    assert first_losses["unguided"] == pytest.approx(first_losses["guided_untrained"], abs=0.2)


@pytest.mark.parametrize("override, message", [
    ("guidance.target_layers=[layers.9]", "no layer 'layers.9'"),
    ("guidance.similarity=ckaa", "unknown similarity 'ckaa'"),
    ("guidance.conditions=[guided_untrained]", None),
])
def test_guide_bad_input(workdir, capsys, override, message):
    args = ["configs/tiny_guide_digits.yaml", "--set", override]
    if message is None:  # guided_untrained without a guide architecture
        args += ["--set", "guidance.guide=null"]
        message = "needs guidance.guide"
    assert run_cli("guide", *args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not Path("checkpoints/tiny_guide_digits").exists()


def test_unbiased_cka_needs_four_samples(workdir, capsys):
    assert run_cli("guide", "configs/tiny_guide_digits.yaml", "--set", "guidance.similarity=cka_unbiased",
                   "--set", "train.batch_size=2", "--set", "guidance.conditions=[unguided]") == 2
    assert "at least 4 samples" in capsys.readouterr().err
