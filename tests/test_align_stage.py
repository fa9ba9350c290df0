"""End to end: align.py sweeps rules x widths (x lrs x data limits) as sub-runs on the same data and initial
weights, logs alignment scores with chance controls, writes results.csv and the plots; bad input gives one line,
exit 2 and nothing written; the Add-task generators; train.rule in another stage; resume keeps the initial net."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from instill.data.add import add_sequences
from instill.run import read_metrics
from tests.conftest import run_cli


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_align_sweep_writes_rows_scores_and_plots(workdir):
    assert run_cli("align", "configs/tiny_align.yaml") == 0
    root = Path("checkpoints/tiny_align")
    rows = _rows(root / "results.csv")
    assert [(r["rule"], r["width"]) for r in rows] == [(rule, w) for w in ("8", "16") for rule in (
        "backprop", "align_zero", "align_ada", "align_prop", "fa", "dfa", "last_layer")]
    layers = ["blocks.0.layer", "blocks.1.layer", "head"]
    for r in rows:
        assert 0 <= float(r["test_acc"]) <= 1 and r["seed"]
        scored = [r[f"align/{layer}"] for layer in layers]
        assert all(scored) == (r["rule"] == "backprop"), r
    backprop = read_metrics(root / "backprop-w16-lr2")
    assert len(backprop) == 2 and all(0 < backprop[-1][f"align/{layer}"] <= 1 for layer in layers)
    assert {f"align_shuffled_update/{layer}" for layer in layers} <= set(backprop[-1])
    for plot in ("accuracy_vs_width.png", "alignment_vs_width.png", "alignment_vs_epoch.png"):
        assert (root / plot).stat().st_size > 0
    # every rule at one width starts from the same initial weights: the first step's training loss agrees
    first = {r["rule"]: read_metrics(root / f"{r['rule']}-w8-lr2")[0]["train_loss"] for r in rows[:7]}
    assert max(first.values()) - min(first.values()) < 0.05, first


def test_data_limits_keep_the_held_out_sets(workdir):
    assert run_cli("align", "configs/tiny_align.yaml", "--set", "align.rules=[align_zero]", "--set",
                   "align.widths=null", "--set", "align.data_limits=[20,60]", "--set", "train.epochs=1") == 0
    rows = _rows("checkpoints/tiny_align/results.csv")
    assert [r["data_limit"] for r in rows] == ["20", "60"]
    assert Path("checkpoints/tiny_align/align_zero-lr2-n20").is_dir()


@pytest.mark.parametrize("override, message", [
    ("model={name: add_rnn, width: 4}", "align.rules: dfa needs"),
    ("align.widths=[0]", "align.widths.0"),
    ("align.widths=[100000]", "align.widths.0"),
    ("align.data_limits=[5000]", "the training split has 100"),
    ("align.score_layers=[blocks.0.layr]",
     "align.score_layers: unknown layer 'blocks.0.layr' in the model (did you mean"),
    ("align.rules=[backprop,dfx]", "unknown learning rule 'dfx'"),
    ("train.rule=align_zeroo", "did you mean 'align_zero'"),
    ("model.width=0", "model: width: Input should be greater than or equal to 1"),
    ("train.rule_options={dfa: {feedback: sparse}}", "train.rule_options: dfa: feedback: Input should be"),
    ("train.rule_options={dfa: {feedbak: pooled}}", "did you mean 'feedback'"),
    ("train.rule_options={dfx: {}}", "unknown learning rule 'dfx'"),
])
def test_align_bad_input(workdir, capsys, override, message):
    args = ["configs/tiny_align.yaml", "--set", override]
    if "add_rnn" in override:
        args += ["--set", "data={name: add_task}", "--set", "align.widths=null"]
    code = run_cli("align", *args)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not Path("checkpoints/tiny_align").exists()


def test_dfa_without_registered_readout_is_refused_before_writing(workdir, capsys):
    code = run_cli("align", "configs/tiny_align.yaml", "--set", "model={name: fcn, depth: 1, width: 8}",
                   "--set", "align.rules=[dfa]", "--set", "align.widths=null")
    err = capsys.readouterr().err.strip()
    assert code == 2 and "dfa needs a registered readout" in err and len(err.splitlines()) == 1
    assert not Path("checkpoints/tiny_align").exists()


def test_add_task_generator_fixed_and_legacy():
    x, y = add_sequences(40, 12, 2, 5, seed=99)
    assert np.allclose(y[:, 5:], 0.5 + 0.5 * x[:, 3:-2] - 0.25 * x[:, :-5])
    assert np.allclose(y[:, :2], 0.5)  # no past input yet: nothing wraps around from the future
    _, legacy = add_sequences(40, 12, 2, 5, seed=99, legacy=True)
    assert not np.allclose(legacy[5:, :2], 0.5)  # the original's rows-for-columns bug: future inputs leak in
    assert np.allclose(legacy[5:, 5:], y[5:, 5:]) and not np.allclose(legacy[:5, 5:], y[:5, 5:])


def test_add_task_runs_the_rnn_rules(workdir):
    # Width 16: at width 4 about one seed in 15 starts with every ReLU unit dead, no gradient reaches the input
    # weights, and the alignment score rightly refuses the layer (0 of 30 seeds at 16).
    assert run_cli("align", "configs/tiny_align.yaml", "--set", "data={name: add_task, train: 8, test: 4, val: 4, "
                   "length: 6}", "--set", "model={name: add_rnn, width: 16, batch_slots: 4}", "--set",
                   "align.rules=[backprop,align_zero,align_ada,last_layer]", "--set", "align.widths=null",
                   "--set", "train.batch_size=4", "--set", "train.eval_batch_size=4",
                   "--set", "train.optimizer.lr=0.001", "--set",
                   "train.select_metric=val_loss", "--set", "train.select_mode=min") == 0
    rows = _rows("checkpoints/tiny_align/results.csv")
    assert [r["rule"] for r in rows] == ["backprop", "align_zero", "align_ada", "last_layer"]
    assert all(float(r["best_test_loss"]) <= float(r["test_loss"]) + 1e-9 for r in rows)
    assert rows[0]["align/recurrent"]


def test_train_rule_in_the_base_stage_and_resume_keeps_the_initial_network(workdir):
    from instill.config import TrainConfig
    from instill.data import Split
    from instill.registry import MODELS
    from instill.run import Run
    from instill.train import Objective, classification_loss, fit

    torch.manual_seed(0)
    info = {"input_shape": (1, 4, 4), "num_classes": 3}
    x, y = torch.randn(40, 1, 4, 4), torch.randint(0, 3, (40,))
    cfg = TrainConfig(epochs=3, batch_size=10, rule="align_zero", progress=False,
                      optimizer={"name": "SGD", "lr": 0.5})

    def objective():
        return Objective(lambda m, b: (classification_loss(m(b[0]), b[1]), {}), lambda m: {"val_acc": 0.0})

    def train(path, epochs, resume=False):
        torch.manual_seed(1)
        model = MODELS.build("ntk_mlp", info, {"depth": 1, "width": 8})
        run = Run.create(path, "x: 1\n", 0, "cpu", resume)
        try:
            fit(model, objective(), Split(x, y), cfg.model_copy(update={"epochs": epochs}), run, seed=3,
                device=torch.device("cpu"), restore_best=False)
        finally:
            run.close()
        return model

    whole = train("whole", 3)
    train("part", 2)
    resumed = train("part", 3, resume=True)
    for a, b in zip(whole.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


def test_cifar_shaped_cnn_on_a_local_image_folder(workdir):
    """CIFAR-10 or KMNIST exported as an image folder (never downloaded) trains the original's CIFAR shape."""
    from tests.test_align_folders import random_image_folder

    random_image_folder(workdir / "images", per_class=6, size=12, mode="RGB")
    assert run_cli("align", "configs/tiny_align.yaml", "--set", "data={name: image_folder, train_dir: images, "
                   "resolution: 8, val_fraction: 0.2, test_fraction: 0.2}", "--set",
                   "model={name: ntk_cnn, shape: cifar, width: 2}", "--set", "align.rules=[backprop,align_ada]",
                   "--set", "align.widths=null", "--set", "train.epochs=1", "--set", "train.batch_size=6") == 0
    rows = _rows("checkpoints/tiny_align/results.csv")
    assert [r["rule"] for r in rows] == ["backprop", "align_ada"] and rows[0]["align/blocks.6.layer"]


def test_a_layer_no_gradient_reaches_stops_the_run_naming_it(workdir, capsys):
    # Seed 3297482197558295524 at width 4: every unit of the add RNN dead from the start, so backprop never changes
    # its input weights and their alignment score has nothing to compare.
    assert run_cli("align", "configs/tiny_align.yaml", "--set", "data={name: add_task, train: 8, test: 4, val: 4, "
                   "length: 6}", "--set", "model={name: add_rnn, width: 4, batch_slots: 4}", "--set",
                   "align.rules=[backprop]", "--set", "align.widths=null", "--set", "train.batch_size=4",
                   "--set", "train.eval_batch_size=4", "--set", "train.optimizer.lr=0.001", "--set",
                   "reproducibility.reproduce=true", "--set", "reproducibility.random_seed=3297482197558295524") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: layer input: alignment score: the layer's weights have not changed (no gradient reached "
                   "it: dead units, or nothing was trained yet)"], err
    assert not list(Path("checkpoints").glob("*"))
