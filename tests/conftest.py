"""Shared fixtures: run entry points in-process, inside a temporary working directory."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

# The benchmarks import their shared helpers as `from timing import ...` (a script's folder is on its path); tests that
# import `bench.<name>` need the same.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

REPO = Path(__file__).resolve().parent.parent
CONFIGS = Path(__file__).resolve().parent / "configs"

torch.set_num_threads(1)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A temporary working directory holding a copy of the test configs; checkpoints/ lands inside it."""
    shutil.copytree(CONFIGS, tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def replace_stage_main(monkeypatch, name: str, main):
    """Run ``main`` in place of stage ``name``'s own until the test (or ``monkeypatch``'s context) ends: a test's
    injected failure. Returns the stage's own ``main``."""
    import dataclasses

    from instill.stages import STAGES

    entry = STAGES.get(name)
    replaced = dataclasses.replace(entry, build=dataclasses.replace(entry.build, main=main))
    monkeypatch.setitem(STAGES._entries, name, replaced)
    return entry.build.main


def run_cli(stage: str, *argv: str) -> int:
    from instill.cli import main

    return main(stage, list(argv))


def python_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    return env


@pytest.fixture(scope="session")
def tiny_convnet_runs(tmp_path_factory) -> Path:
    """The two tiny ConvNet runs (digits) that the stitch and compare tests read, trained once per session: their
    checkpoints folder. Tests copy it before changing anything in it."""
    folder = tmp_path_factory.mktemp("tiny_convnets")
    shutil.copytree(CONFIGS, folder / "configs")
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        for name in ("tiny_stitch_a", "tiny_stitch_b"):
            assert run_cli("base", f"configs/{name}.yaml") == 0
    finally:
        os.chdir(cwd)
    return folder / "checkpoints"


def forked_at_once(target, count: int = 2, timeout: float = 120) -> list[int]:
    """Run ``target`` in ``count`` forked processes that start it at the same moment (behind a barrier); their exit
    codes."""
    import multiprocessing

    forked = multiprocessing.get_context("fork")
    start = forked.Barrier(count)

    def launch():
        start.wait()
        target()

    processes = [forked.Process(target=launch) for _ in range(count)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout)
    return [process.exitcode for process in processes]
