"""The stages package keeps one concern per module: the runner, upstream runs, the task, compatibility checks."""

from __future__ import annotations

import ast
import importlib

from tests.conftest import REPO

CONCERNS = {
    "runner": {"execute", "Context", "Interrupted", "load_stage_config", "stage_module", "build_data"},
    "upstream": {"resolve_upstream", "UpstreamPlacement", "upstream_runs_in"},
    "task": {"make_loss", "evaluate_task", "summary_metrics"},
    "compatibility": {"check_data_fits", "check_compatible", "UsesBaseModel"},
}


def test_the_stages_package_defines_nothing_itself_and_each_concern_lives_in_its_module():
    tree = ast.parse((REPO / "core/stages/__init__.py").read_text())
    defined = [n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))]
    assert defined == []
    for module, names in CONCERNS.items():
        source = ast.parse((REPO / f"core/stages/{module}.py").read_text())
        own = {n.name for n in source.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        assert names <= own, (module, names - own)
    stages = importlib.import_module("instill.stages")
    assert stages.execute is importlib.import_module("instill.stages.runner").execute
