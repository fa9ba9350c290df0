"""--validate catches what a run would fail on; a replay names the recorded setting it differs in; install hints."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from tests.conftest import run_cli


def _validate_error(capsys, *sets: str, config: str = "configs/tiny_digits.yaml", stage: str = "base") -> str:
    argv = [config, "--validate", *[a for item in sets for a in ("--set", item)]]
    assert run_cli(stage, *argv) == 2
    assert not Path("checkpoints").exists()
    return capsys.readouterr().err


def test_validate_rejects_an_unknown_timm_model(workdir, capsys):
    pytest.importorskip("timm")
    err = _validate_error(capsys, "model={name: 'timm:resnet9000'}")
    assert err == "error: model timm:resnet9000: unknown timm model (did you mean 'resnet200'?)\n"


def test_validate_rejects_a_missing_image_folder(workdir, capsys):
    err = _validate_error(capsys, "data={name: image_folder, train_dir: no_such_folder}")
    assert err == "error: data.train_dir 'no_such_folder' does not exist\n"
    (workdir / "imgs" / "cat").mkdir(parents=True)
    err = _validate_error(capsys, "data={name: image_folder, train_dir: imgs, classes: [cat, dog]}")
    assert "lacks class folders ['dog']" in err
    err = _validate_error(capsys, "data={name: image_folder, train_dir: imgs, eval_dirs: {pooled: nope}}")
    assert err == "error: data.eval_dirs.pooled 'nope' does not exist\n"


def test_validate_checks_weights_files_against_the_architecture(workdir, capsys):
    pytest.importorskip("timm")
    from safetensors.torch import save_file

    model = "model={name: 'timm:resnet10t', pretrained: true, weights_path: %s}"
    err = _validate_error(capsys, model % "missing.safetensors")
    assert err == "error: model timm:resnet10t: weights_path missing.safetensors not found\n"
    save_file({"not_a_resnet.weight": torch.zeros(2)}, "other.safetensors")
    err = _validate_error(capsys, model % "other.safetensors")
    assert "other.safetensors does not match the architecture" in err and "not_a_resnet.weight" in err


def test_validate_names_the_command_that_installs_a_missing_logger(workdir, capsys, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    err = _validate_error(capsys, "logging.wandb=true")
    assert err.startswith("error: logging.wandb: true needs the wandb package, which is not installed (pip install")


def test_validate_checks_upstream_configs_without_running_them(workdir, capsys):
    assert run_cli("transfer", "configs/tiny_shapes_transfer.yaml", "--validate") == 0
    out = capsys.readouterr().out
    assert "note: base: checkpoints/tiny_shapes_base does not exist yet" in out
    assert "note: transfer.mask: checkpoints/tiny_shapes_ablate does not exist yet" in out
    assert not Path("checkpoints").exists()
    pytest.importorskip("timm")
    base = Path("configs/tiny_shapes_base.yaml")  # the upstream of the upstream: its model fails the check
    base.write_text(base.read_text() + "\nmodel: {name: 'timm:resnet9000'}\n")
    assert run_cli("transfer", "configs/tiny_shapes_transfer.yaml", "--validate") == 2
    assert capsys.readouterr().err == "error: model timm:resnet9000: unknown timm model (did you mean 'resnet200'?)\n"
    assert not Path("checkpoints").exists()


def test_a_replay_that_differs_under_other_code_names_both_commits(workdir, capsys):
    assert run_cli("base", "configs/tiny_digits.yaml", "--set", "train.threads=1", "--set", "train.epochs=1") == 0
    env_file, metrics = Path("checkpoints/tiny_digits/env.json"), Path("checkpoints/tiny_digits/metrics.jsonl")
    env = json.loads(env_file.read_text())
    if env["git_commit"] is None:
        pytest.skip("not run from a git checkout: no commit recorded")
    env_file.write_text(json.dumps({**env, "git_commit": "0" * 40}))  # as if an older instill had run it
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    rows[0]["train_loss"] = rows[0]["train_loss"] + 1  # and its results differed
    metrics.write_text("".join(json.dumps(row) + "\n" for row in rows))
    capsys.readouterr()
    assert run_cli("base", "checkpoints/tiny_digits/config.yaml") == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.endswith(f"DIFFERS from the original (max_abs_diff=1.0); the code changed since the original "
                         f"(instill commit 0000000 -> {env['git_commit'][:7]})"), last
    replay = json.loads(Path("checkpoints/tiny_digits-replay-1/replay.json").read_text())
    assert replay["code_changed"] == f"instill commit 0000000 -> {env['git_commit'][:7]}"


def test_a_replay_runs_at_the_recorded_thread_count_or_says_which_setting_differs(workdir, capsys, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        assert run_cli("base", "configs/tiny_digits.yaml", "--set", "train.threads=2", "--set", "train.epochs=1") == 0
        assert json.loads(Path("checkpoints/tiny_digits/env.json").read_text())["torch_threads"] == 2
        torch.set_num_threads(1)
        assert run_cli("base", "checkpoints/tiny_digits/config.yaml") == 0  # the snapshot's count: 2
        assert json.loads(Path("checkpoints/tiny_digits-replay-1/replay.json").read_text())["settings_differ"] == []
        capsys.readouterr()
        assert run_cli("base", "checkpoints/tiny_digits/config.yaml", "--set", "train.threads=1") == 0
        out = capsys.readouterr().out
        replay = json.loads(Path("checkpoints/tiny_digits-replay-2/replay.json").read_text())
        assert replay["settings_differ"] == ["torch_threads 2 -> 1"]
        assert ("this replay's settings differ from the recorded ones (torch_threads 2 -> 1): its metrics are not "
                "expected to match the original's bit for bit") in out
        last = out.strip().splitlines()[-1]
        assert last.startswith("replay of checkpoints/tiny_digits: ")
        assert replay["matches"] or last.endswith("recorded settings differ: torch_threads 2 -> 1")
    finally:
        torch.set_num_threads(before)


def test_threads_default_to_the_free_cores_and_follow_omp_num_threads(monkeypatch):
    from instill.stages.runner import free_core_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(os, "getloadavg", lambda: (5.0, 5.0, 5.0))
    assert free_core_threads() == 1  # a busy machine: one thread, not one per core
    monkeypatch.setattr(os, "getloadavg", lambda: (0.1, 0.1, 0.1))
    assert free_core_threads() == 2
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert free_core_threads() == 1


def test_install_hints_are_commands_that_work_from_a_clone(monkeypatch, tmp_path):
    from instill.errors import install_hint

    root = Path(__file__).resolve().parent.parent
    monkeypatch.chdir(root)
    assert install_hint("tensorboard", "tensorboard") == "pip install -e '.[tensorboard]'"
    monkeypatch.chdir(root / "configs")
    assert install_hint("tensorboard", "tensorboard") == "pip install -e '..[tensorboard]'"
    assert install_hint(None, "sklearn") == "pip install -e '..'"
