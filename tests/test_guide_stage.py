"""End to end: guide.py conditions as sub-runs with one results table; bad input gives one line and exit 2 with
nothing written; library ResNets as guides; the options (guidance steps, noise inputs, weights, mean) take effect."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from instill.run import is_finished, read_metrics
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
    from instill.compare.sources import load_model_source  # every condition's trained target is a model source

    info = json.loads((root / "unguided" / "model.json").read_text())["info"]
    targets = {c: load_model_source({"run": str(root / c)}, info).model for c in ("unguided", "guided_untrained")}
    assert any(not torch.equal(p, q) for p, q in zip(*(t.parameters() for t in targets.values())))


@pytest.mark.parametrize("override, message", [
    ("guidance.target_layers=[layers.9]", "unknown layer 'layers.9'"),
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


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def _run(config: str, *overrides: str) -> int:
    return run_cli("guide", config, *[arg for item in overrides for arg in ("--set", item)])


@pytest.mark.parametrize("overrides, message", [
    # token-wise: the RNN classifier's 2-D head against the Transformer's (batch, time, d) layer output
    (["guidance.tokenwise=true", "guidance.guide_layers=[type:RNN, head]",
      "guidance.layer_map=[{target: layers.0, guide: head}]"],
     "pair layers.0~head compares target shape (16, 8, 16) with guide shape (16, 2): token-wise"),
    (["guidance.target_batch_axes={layers.0: 1}"], "layer 'layers.0' gives shape (8, 16, 16), whose first axis"),
    (["guidance.guide_batch_axes={layers.9: 1}"], "unknown layer 'layers.9' in RecurrentClassifier"),
    (["guidance.similarity=cka_unbiased", "guidance.tokenwise=positions", "train.batch_size=3"],
     "needs at least 4 samples per batch"),
    (["train.batch_size=2"], "similarity cka needs at least 3 samples per batch"),  # CKA of 2 samples is always 1
    (["guidance.similarity=procrustes", "train.batch_size=2"], "similarity procrustes needs at least 3 samples"),
])
def test_bad_pairs_are_caught_before_the_run_directory_exists(workdir, capsys, overrides, message):
    assert _run("configs/tiny_guide_parity.yaml", *overrides) == 2
    assert message in _one_error_line(capsys)
    assert not Path("checkpoints/tiny_guide_parity").exists()  # the unguided sub-run did not start either


def test_tokenwise_needs_token_data(workdir, capsys):
    assert _run("configs/tiny_guide_digits.yaml", "guidance.tokenwise=rows") == 2
    assert "token-wise similarity needs token sequences; data digits" in _one_error_line(capsys)
    assert not Path("checkpoints/tiny_guide_digits").exists()


def test_a_trained_guide_must_fit_this_runs_data_and_its_architecture(workdir, capsys):
    trained = ["guidance.conditions=[unguided, guided_trained]"]
    assert _run("configs/tiny_guide_digits.yaml", *trained, "data.name=mnist5k", "data.limit=100") == 2
    err = _one_error_line(capsys)
    assert "input_shape is (1, 28, 28) but the guide in checkpoints/tiny_digits was built for (1, 8, 8)" in err
    assert err.startswith("error: data (mnist5k): ")
    assert not Path("checkpoints/tiny_guide_digits").exists()
    sidecar = Path("checkpoints/tiny_digits/model.json")  # the checkpoint no longer fits its architecture
    meta = json.loads(sidecar.read_text())
    meta["model"]["width"] = 16
    sidecar.write_text(json.dumps(meta))
    assert _run("configs/tiny_guide_digits.yaml", *trained) == 2
    assert ("does not match model 'fcn': Error(s) in loading state_dict for FCN: size mismatch for layers.0.0.weight"
            in _one_error_line(capsys))
    assert not Path("checkpoints/tiny_guide_digits").exists()


@pytest.mark.parametrize("guide", ["timm:resnet18", "torchvision:resnet18"])
def test_library_resnets_guide_a_fcn(workdir, guide):
    assert _run("configs/tiny_guide_digits.yaml", "guidance.conditions=[guided_untrained]", f"guidance.guide={{name: "
                f"'{guide}', pretrained: false}}", "guidance.guide_layers=[type:Conv2d]", "train.max_steps=2") == 0
    rows = read_metrics(Path("checkpoints/tiny_guide_digits/guided_untrained"))
    pairs = [k.removeprefix("sim/").split("~") for k in rows[-1] if k.startswith("sim/")]
    assert rows[-1]["step"] == 2 and rows[-1]["align_loss"] > 0
    assert len(pairs) == 19 and len({t for t, _ in pairs}) == 4  # ResNet-18's 20 convs but the last, 4 FCN layers


GUIDED = ["guidance.conditions=[guided_untrained]", "reproducibility.reproduce=true",
          "reproducibility.random_seed=7"]


def test_guidance_stops_after_guidance_steps(workdir):
    assert _run("configs/tiny_guide_digits.yaml", *GUIDED, "guidance.guidance_steps=2", "train.eval_unit=step",
                "train.max_steps=4") == 0
    rows = read_metrics(Path("checkpoints/tiny_guide_digits/guided_untrained"))
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r["align_loss"] > 0 and any(k.startswith("sim/") for k in r) for r in rows[:2])
    assert all(r["align_loss"] == 0 and not any(k.startswith("sim/") for k in r) for r in rows[2:])


@pytest.mark.parametrize("config", ["configs/tiny_guide_digits.yaml", "configs/tiny_guide_parity.yaml"])
def test_noise_inputs_reach_the_guide(workdir, config):
    sims = {}
    for noise in (False, True):
        assert _run(config, *GUIDED, f"guidance.noise_inputs={str(noise).lower()}", "train.max_steps=1",
                    f"output_dir=checkpoints/noise_{noise}") == 0
        row = read_metrics(Path(f"checkpoints/noise_{noise}/guided_untrained"))[-1]
        sims[noise] = {k: v for k, v in row.items() if k.startswith("sim/")}
        assert row["task_loss"] == pytest.approx(read_metrics(Path("checkpoints/noise_False/guided_untrained"))[-1]
                                                 ["task_loss"])  # the same target, batch and start
    assert sims[False].keys() == sims[True].keys()
    assert all(sims[False][k] != pytest.approx(sims[True][k], abs=1e-4) for k in sims[False])


def test_explicit_pair_weights_and_mean_reduction(workdir):
    pairs = ("[{target: layers.0.0, guide: layers.0.0, weight: 2.0}, "
             "{target: layers.2.0, guide: layers.1.0, weight: 0.5}]")
    assert _run("configs/tiny_guide_digits.yaml", *GUIDED, f"guidance.layer_map={pairs}", "guidance.reduce=mean",
                "guidance.alpha=3.0", "train.max_steps=3") == 0
    row = read_metrics(Path("checkpoints/tiny_guide_digits/guided_untrained"))[-1]
    distances = [2.0 * (1 - row["sim/layers.0.0~layers.0.0"]), 0.5 * (1 - row["sim/layers.2.0~layers.1.0"])]
    assert row["align_loss"] == pytest.approx(3.0 * sum(distances) / 2, rel=1e-5)  # epoch means are linear
