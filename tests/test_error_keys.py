"""Library functions never name YAML keys in their messages; the stage that passes a config value adds the key
(``instill.errors.under_key``)."""

from __future__ import annotations

import ast
import re

import pytest

from instill.align.scores import check_layers
from instill.errors import UserError, under_key
from instill.registry import BUILTIN_MODULES
from tests.conftest import REPO

SECTIONS = ("align", "guidance", "mask", "transfer", "stitch", "compare", "model", "data", "train", "logging",
            "ablate", "reproducibility")
NAMES_A_KEY = re.compile(rf"^({'|'.join(SECTIONS)})\.[a-z_]+")
# Config-facing code, which may name its keys: the config and command line, the stages, and the training loop
# (configured by the train section itself); sweep and reproduce read whole configs; each system's stage module.
CONFIG_FACING = ("config.py", "cli.py", "train.py", "sweep.py", "reproduce.py", "stages/",
                 *(module.replace(".", "/") + ".py" for module in BUILTIN_MODULES["stage"].values()))


def _messages(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "UserError" and node.args:
            first = node.args[0]
            part = first.values[0] if isinstance(first, ast.JoinedStr) and first.values else first
            if isinstance(part, ast.Constant) and isinstance(part.value, str):
                yield node.lineno, part.value


def test_no_library_message_names_a_config_key():
    named = [f"{path.relative_to(REPO)}:{line}: {text}" for path in sorted((REPO / "core").rglob("*.py"))
             if not any(str(path.relative_to(REPO / "core")).startswith(c) for c in CONFIG_FACING)
             for line, text in _messages(path) if NAMES_A_KEY.match(text)]
    assert named == []


def test_under_key_prefixes_a_user_error_and_lets_other_errors_pass():
    with pytest.raises(UserError, match=r"^align\.score_layers: unknown layer 'x' in the model"):
        with under_key("align.score_layers"):
            check_layers(["x"], ["a", "b"])
    with pytest.raises(KeyError), under_key("model"):
        raise KeyError("a bug keeps its type")
    with pytest.raises(UserError) as err:
        check_layers(["x"], ["a", "b"])
    assert str(err.value).startswith("unknown layer 'x'")  # the library alone names no key
