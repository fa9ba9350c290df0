"""Your own models and data: by import path in a config, and through the instill.models / instill.datasets
entry-point groups of an installed package (a dist-info made here on sys.path)."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from instill.registry import DATASETS, MODELS
from tests.conftest import run_cli

NETS = '''
import math
from torch import nn


class TinyNet(nn.Module):
    """A one-hidden-layer net sized from the data."""

    def __init__(self, input_shape, num_classes, hidden: int = 16, activation: str = "relu"):
        super().__init__()
        act = {"relu": nn.ReLU(), "tanh": nn.Tanh()}[activation]
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), hidden), act,
                                 nn.Linear(hidden, num_classes))

    def forward(self, x):
        return self.net(x)


def build_wide(info, *, width: int = 32):
    """A builder in instill's own form."""
    return TinyNet(info.input_shape, info.num_classes, hidden=width)
'''

# the blobs dataset of the plug-in fixture package (tests/test_plugins.py), installed here under another name
DATA = (Path(__file__).resolve().parent / "fixtures" / "user_plugins" / "instill_toys" / "data.py").read_text()


@pytest.fixture(scope="module")
def own_package(tmp_path_factory):
    site = tmp_path_factory.mktemp("site")
    package = site / "instill_userpkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "nets.py").write_text(NETS)
    (package / "data.py").write_text(DATA)
    info = site / "instill_userpkg-0.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: instill-userpkg\nVersion: 0.3\n")
    (info / "top_level.txt").write_text("instill_userpkg\n")
    (info / "entry_points.txt").write_text(textwrap.dedent("""\
        [instill.models]
        user_wide = instill_userpkg.nets:build_wide
        [instill.datasets]
        user_blobs = instill_userpkg.data:blobs
        """))
    sys.path.insert(0, str(site))
    yield site
    sys.path.remove(str(site))
    for registry in (MODELS, DATASETS):
        for name in [n for n in registry._entries if n.startswith(("instill_userpkg", "user_"))]:
            del registry._entries[name]
    for module in [m for m in sys.modules if m.startswith("instill_userpkg")]:
        del sys.modules[module]


def write_config(path: Path, data: dict, model: dict) -> str:
    path.write_text(yaml.safe_dump({"data": data, "model": model, "train": {
        "epochs": 10, "batch_size": 32, "threads": 1, "optimizer": {"name": "AdamW", "lr": 0.03}}}))
    return str(path)


def test_a_model_class_by_import_path_trains_records_its_origin_and_replays(own_package, workdir, capsys):
    config = write_config(workdir / "own.yaml", {"name": "digits", "limit": 300},
                          {"name": "instill_userpkg.nets:TinyNet", "hidden": 8, "activation": "tanh"})
    assert run_cli("base", config) == 0
    run = workdir / "checkpoints/own"
    snapshot = yaml.safe_load((run / "config.yaml").read_text())
    assert snapshot["model"] == {"name": "instill_userpkg.nets:TinyNet", "hidden": 8, "activation": "tanh"}
    origin = json.loads((run / "env.json").read_text())["outside_code"]["model:instill_userpkg.nets:TinyNet"]
    assert origin["file"].endswith("instill_userpkg/nets.py") and origin["package"] == "instill-userpkg 0.3"
    assert run_cli("base", str(run / "config.yaml")) == 0
    assert json.loads((workdir / "checkpoints/own-replay-1/replay.json").read_text())["matches"] is True


@pytest.mark.parametrize("model, message", [
    ({"name": "instill_userpkg.nets:TinyNet", "hiden": 8}, "model: unknown key 'hiden' (did you mean 'hidden'?)"),
    ({"name": "instill_userpkg.nets:TinyNet", "hidden": "many"}, "model: hidden: Input should be a valid integer"),
    ({"name": "instill_userpkg.nets:TinyNett"}, "has no 'TinyNett' (did you mean 'TinyNet'?)"),
    ({"name": "instill_nopkg.nets:Net"}, "cannot import instill_nopkg.nets (ModuleNotFoundError"),
])
def test_own_code_options_are_validated_like_built_in_ones(own_package, workdir, capsys, model, message):
    config = write_config(workdir / "bad.yaml", {"name": "digits", "limit": 300}, model)
    assert run_cli("base", config, "--validate") == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (workdir / "checkpoints").exists()


def test_entry_points_register_a_packages_models_and_datasets_for_every_script(own_package, workdir, capsys):
    config = write_config(workdir / "plugged.yaml", {"name": "user_blobs", "n": 200},
                          {"name": "user_wide", "width": 12})
    assert run_cli("base", config) == 0
    summary = json.loads((workdir / "checkpoints/plugged/summary.json").read_text())
    assert summary["test_acc"] > 0.5  # 3 blobs 3 sd apart (chance 0.33): the bar says it trained
    from instill.cli import list_entries

    assert "user_wide: A builder in instill's own form." in list_entries("models")
    assert "    n: int = 240" in list_entries("datasets")
