"""The issue's "done when": pip install the project into a fresh environment next to a user's own package that
has a ``core/`` folder, ``import instill``, name one's own model class in a config and run a stage on it (with
TensorBoard event files where tensorboard is installed). Offline: a wheel built here, installed without
dependencies into a new venv that sees this environment's libraries (torch, ...) through a .pth file."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.conftest import REPO

USER_NET = '''
import math

from torch import nn


class MyNet(nn.Module):
    """A user's own model class: input_shape and num_classes come from the run's data, hidden from the config."""

    def __init__(self, input_shape, num_classes, hidden: int = 16):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), hidden), nn.ReLU(),
                                 nn.Linear(hidden, num_classes))

    def forward(self, x):
        return self.net(x)
'''


def _run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing of the repository on the path
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A fresh venv with the instill-torch wheel installed (no dependencies: this environment lends them)."""
    root = tmp_path_factory.mktemp("install")
    src = root / "src"
    src.mkdir()
    shutil.copy(REPO / "pyproject.toml", src)
    shutil.copy(REPO / "README.md", src)
    shutil.copytree(REPO / "core", src / "core", ignore=shutil.ignore_patterns("__pycache__"))
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w",
          str(root / "dist"), str(src)], root)
    env = root / "env"
    _run([sys.executable, "-m", "venv", "--without-pip", str(env)], root)
    python = env / "bin" / "python"
    site = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], root).stdout.strip()
    # this environment's libraries, but not its editable instill (a plain path line runs no .pth hook)
    Path(site, "lent_libraries.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    wheel = next((root / "dist").glob("instill_torch-*.whl"))
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q",
          str(wheel)], root)
    return env


def test_a_user_project_with_its_own_core_package_runs_a_stage_on_its_own_model(installed, tmp_path):
    project = tmp_path / "project"
    (project / "core").mkdir(parents=True)
    (project / "core" / "__init__.py").write_text("")
    (project / "core" / "config.py").write_text("RunConfig = 'the user project own'\n")
    (project / "mynets.py").write_text(USER_NET)
    tensorboard = _has("tensorboard")
    config = {"data": {"name": "digits", "limit": 100}, "model": {"name": "mynets:MyNet", "hidden": 8},
              "train": {"epochs": 1, "threads": 1, "progress": False}, "logging": {"tensorboard": tensorboard}}
    (project / "mine.yaml").write_text(json.dumps(config))  # JSON is YAML
    python = installed / "bin" / "python"
    probe = _run([str(python), "-c", "import core.config, instill, instill.config; "
                  "print(core.config.RunConfig); print(instill.__file__); print(instill.config.RunConfig.__name__)"],
                 project).stdout.splitlines()
    assert probe[0] == "the user project own" and probe[2] == "RunConfig"
    assert Path(probe[1]).is_relative_to(installed) and not Path(probe[1]).is_relative_to(REPO)
    _run([str(installed / "bin" / "instill"), "base", "mine.yaml", "--out", "checkpoints/mine"], project)
    run = project / "checkpoints" / "mine"
    summary = json.loads((run / "summary.json").read_text())
    assert 0 <= summary["test_acc"] <= 1
    assert "mynets:MyNet" in (run / "config.yaml").read_text() and "mynets:MyNet" in (run / "env.json").read_text()
    if tensorboard:
        assert list((run / "tensorboard").glob("events.out.tfevents.*"))


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None
