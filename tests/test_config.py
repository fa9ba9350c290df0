"""Config validation: every bad-input case gives one line naming the file and key, exit code 2, nothing written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from instill.config import apply_overrides, deep_merge, read_yaml
from instill.errors import UserError
from instill.stages import load_stage_config
from tests.conftest import REPO, python_env, run_cli

GOOD = """
data: {name: digits, limit: 100}
model: {name: fcn, depth: 1, width: 8}
train: {epochs: 1, threads: 1}
"""


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def one_line_and_nothing_written(capsys, workdir, *argv: str) -> str:
    assert run_cli("base", *argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert not (workdir / "checkpoints").exists()
    return err


def error_line(capsys, workdir, text: str, *extra: str) -> str:
    return one_line_and_nothing_written(capsys, workdir, str(write(workdir / "bad.yaml", text)), *extra)


@pytest.mark.parametrize("text, expected", [
    (GOOD.replace("epochs", "epocs"), ["bad.yaml", "train.epocs", "did you mean 'epochs'"]),
    (GOOD.replace("depth: 1", "detph: 1"), ["bad.yaml", "model", "detph", "did you mean 'depth'"]),
    (GOOD.replace("epochs: 1", "epochs: many"), ["bad.yaml", "train.epochs", "integer"]),
    (GOOD.replace("epochs: 1", "epochs: -1"), ["bad.yaml", "train.epochs", "greater than or equal to 0"]),
    (GOOD.replace("data: {name: digits, limit: 100}", ""), ["bad.yaml", "missing required key 'data'"]),
    (GOOD.replace("name: fcn", "name: fnc"), ["bad.yaml", "unknown model 'fnc'", "did you mean 'fcn'"]),
    (GOOD + "reproducibility: {reproduce: true}\n", ["bad.yaml", "reproduce: true needs random_seed"]),
    (GOOD + "trian: {}\n", ["bad.yaml", "unknown key 'trian'", "did you mean 'train'"]),
    (GOOD.replace("threads: 1", "threads: 1, optimizer: {name: Adamm}"), ["unknown optimizer 'Adamm'", "'Adam'"]),
    ("", ["bad.yaml", "empty"]),
    ("data: [1, 2\n", ["bad.yaml", "invalid YAML", "line"]),
    ("- a\n- b\n", ["bad.yaml", "mapping"]),
])
def test_bad_config_is_one_line_and_exit_2(capsys, workdir, text, expected):
    err = error_line(capsys, workdir, text)
    for fragment in expected:
        assert fragment in err, err


def test_missing_file(capsys, workdir):
    assert "nowhere.yaml: config file not found" in one_line_and_nothing_written(capsys, workdir, "nowhere.yaml")


def test_unreadable_file(capsys, workdir):
    (workdir / "dir.yaml").mkdir()
    assert "cannot read config file" in one_line_and_nothing_written(capsys, workdir, "dir.yaml")


@pytest.mark.parametrize("override, expected", [
    ("train.optimizer.kwargs.weight_decay=-1", "Invalid weight_decay value: -1"),
    ("train.optimizer.kwargs.momentum=0.9", "unexpected keyword argument 'momentum'"),  # AdamW has none
    ("train.optimizer.kwargs.betas=[0.9]", "AdamW rejects these arguments"),
])
def test_optimizer_arguments_are_checked_with_the_config(capsys, workdir, override, expected):
    err = error_line(capsys, workdir, GOOD, "--set", override)
    assert "bad.yaml: train.optimizer.kwargs: " in err and expected in err, err


def test_bad_override(capsys, workdir):
    err = error_line(capsys, workdir, GOOD, "--set", "train.batch_size=big")
    assert "train.batch_size" in err
    err = error_line(capsys, workdir, GOOD, "--set", "novalue")
    assert "expected section.key=value" in err


def test_wrong_stage(capsys, workdir):
    err = error_line(capsys, workdir, GOOD + "stage: transfer\n")
    assert "stage" in err


def test_overrides_are_typed_like_yaml():
    raw = apply_overrides({"train": {"epochs": 1}}, ["train.epochs=5", "train.optimizer.lr=1e-2", "name=x"])
    assert raw == {"train": {"epochs": 5, "optimizer": {"lr": 0.01}}, "name": "x"}
    with pytest.raises(UserError, match="is a value, not a section"):
        apply_overrides({"train": 3}, ["train.epochs=5"])


def test_extends_merges_and_detects_cycles(tmp_path):
    write(tmp_path / "base.yaml", GOOD)
    write(tmp_path / "child.yaml", "extends: base.yaml\ntrain: {epochs: 7}\n")
    raw = read_yaml(tmp_path / "child.yaml")
    assert raw["train"] == {"epochs": 7, "threads": 1} and raw["model"]["width"] == 8
    write(tmp_path / "a.yaml", "extends: b.yaml\n")
    write(tmp_path / "b.yaml", "extends: a.yaml\n")
    with pytest.raises(UserError, match="cycle"):
        read_yaml(tmp_path / "a.yaml")
    assert deep_merge({"a": {"b": 1, "c": 2}}, {"a": {"b": 3}}) == {"a": {"b": 3, "c": 2}}


def test_defaults_are_filled_and_names_derived(tmp_path):
    cfg = load_stage_config(write(tmp_path / "good.yaml", GOOD), "base", ["train.epochs=4"])
    assert cfg.name == "good" and cfg.output_dir == "checkpoints/good"
    assert cfg.train.epochs == 4 and cfg.model.params["batch_norm"] is False
    assert cfg.reproducibility.reproduce is False and cfg.reproducibility.deterministic is True


def test_print_config_and_validate(capsys, workdir):
    cfg = write(workdir / "good.yaml", GOOD)
    assert run_cli("base", str(cfg), "--print-config", "--set", "train.epochs=9") == 0
    printed = capsys.readouterr().out
    assert "epochs: 9" in printed and "width: 8" in printed
    assert run_cli("base", str(cfg), "--validate") == 0
    assert not (workdir / "checkpoints").exists()


def test_entry_script_exit_code_in_a_subprocess(tmp_path):
    bad = write(tmp_path / "bad.yaml", GOOD.replace("epochs", "epocs"))
    proc = subprocess.run([sys.executable, str(REPO / "vision/vision_base.py"), str(bad)], cwd=tmp_path,
                          capture_output=True, text=True, env=python_env(), timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "train.epocs" in proc.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_switching_a_component_by_name_drops_the_old_entrys_options(capsys):
    from instill.registry import MODELS

    raw = {"model": {"name": "convnet", "channels": [8], "strides": [1], "batch_norm": False},
           "train": {"optimizer": {"name": "AdamW"}}}
    out = apply_overrides(raw, ["model.width=64", "model.name=fcn", "train.optimizer.name=SGD"],
                          components={"model": MODELS})
    assert out["model"] == {"name": "fcn", "width": 64, "batch_norm": False}  # set here, or taken by fcn: kept
    assert "dropped model.channels, model.strides (options of convnet)" in capsys.readouterr().err
    assert apply_overrides(raw, ["model.name=convnet"], components={"model": MODELS})["model"] == raw["model"]
    assert apply_overrides(raw, ["model.name=nonet"], components={"model": MODELS})["model"]["channels"] == [8]


def test_extends_that_switches_the_model_drops_the_parents_options_of_the_old_one(tmp_path, capsys):
    write(tmp_path / "parent.yaml", "data: {name: digits, limit: 100}\n"
          "model: {name: convnet, channels: [8], strides: [1], batch_norm: false}\ntrain: {epochs: 1, threads: 1}\n")
    child = write(tmp_path / "child.yaml", "extends: parent.yaml\nmodel: {name: fcn, width: 16}\n")
    cfg = load_stage_config(child, "base")
    assert cfg.model.name == "fcn" and cfg.model.params["width"] == 16 and cfg.model.params["batch_norm"] is False
    assert "extends: parent.yaml: dropped model.channels, model.strides (options of convnet)" in \
        capsys.readouterr().err
    same = write(tmp_path / "same.yaml", "extends: parent.yaml\nmodel: {name: convnet, batch_norm: true}\n")
    assert load_stage_config(same, "base").model.params["channels"] == [8]  # same entry: everything kept
    assert "dropped" not in capsys.readouterr().err


def test_set_model_name_timm_validates_without_the_previous_models_keys(capsys):
    from tests.conftest import REPO, run_cli

    assert run_cli("base", str(REPO / "configs/vision_base_digits.yaml"), "--set", "model.name=timm:resnet18",
                   "--validate") == 0
    assert "dropped model.channels, model.strides" in capsys.readouterr().err
