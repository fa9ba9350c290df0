"""Registries of datasets and models: typed options from builder signatures, names, offline pretrained weights."""

from __future__ import annotations

import pytest
import torch

from instill.errors import UserError
from instill.models.vision import check_accepts
from instill.registry import DATASETS, MODELS, Registry
from instill.data import DataContext

INFO = {"input_shape": (1, 28, 28), "num_classes": 10}


def test_options_come_from_the_signature():
    params = MODELS.validate("fcn", {"depth": 2})
    assert params == {"depth": 2, "width": 256, "batch_norm": False, "dropout": 0.0, "activation": "relu"}
    with pytest.raises(ValueError, match="did you mean 'width'"):
        MODELS.validate("fcn", {"widht": 3})
    with pytest.raises(ValueError, match="dropout"):
        MODELS.validate("fcn", {"dropout": 1.5})
    with pytest.raises(UserError, match="did you mean 'convnet'"):
        MODELS.get("convnt")


@pytest.mark.parametrize("name, params", [
    ("fcn", {"depth": 2, "width": 16, "batch_norm": True, "dropout": 0.1}),
    ("convnet", {"channels": [8, 16]}),
    ("timm:resnet18", {}),
    ("torchvision:resnet18", {}),
])
def test_models_build_and_run(name, params):
    model = MODELS.build(name, INFO, params)
    check_accepts(model, INFO)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_pretrained_needs_a_local_file(tmp_path):
    with pytest.raises(UserError, match="needs weights_path"):
        MODELS.build("timm:resnet18", INFO, {"pretrained": True})
    with pytest.raises(UserError, match="not found"):
        MODELS.build("torchvision:resnet18", INFO, {"pretrained": True, "weights_path": str(tmp_path / "w.pt")})
    with pytest.raises(UserError, match="unknown timm model"):
        MODELS.build("timm:resnet_eighteen", INFO, {})
    source = MODELS.build("fcn", INFO, {"width": 8, "depth": 1})
    torch.save(source.state_dict(), tmp_path / "w.pt")
    with pytest.raises(UserError, match="does not match"):
        MODELS.build("torchvision:resnet18", INFO, {"pretrained": True, "weights_path": str(tmp_path / "w.pt")})


def test_mismatched_head_or_resolution_is_a_user_error():
    model = MODELS.build("fcn", INFO, {"depth": 1, "width": 8})
    with pytest.raises(UserError, match="cannot take inputs"):
        check_accepts(model, {"input_shape": (1, 8, 8), "num_classes": 10})
    with pytest.raises(UserError, match="3 classes"):
        check_accepts(model, {"input_shape": (1, 28, 28), "num_classes": 3})


def test_image_datasets_are_seeded_and_split():
    a = DATASETS.build("digits", DataContext(seed=1), {})
    b = DATASETS.build("digits", DataContext(seed=1), {})
    c = DATASETS.build("digits", DataContext(seed=2), {})
    assert torch.equal(a.train.y, b.train.y) and not torch.equal(a.train.y, c.train.y)
    assert len(a.train) + len(a.val) + len(a.test) == 1797 and a.info.input_shape == (1, 8, 8)
    mnist = DATASETS.build("mnist5k", DataContext(seed=0), {})
    assert len(mnist.train) + len(mnist.val) + len(mnist.test) == 5000
    assert mnist.info.input_shape == (1, 28, 28)
    assert len(set(mnist.test.y[:100].tolist())) > 5  # shuffled: the file is sorted by class


def test_keywords_a_library_rejects_are_user_errors_but_builder_bugs_keep_their_traceback():
    widgets = Registry("widget")

    def library(size: int = 1, colour: str = "red"):
        return size, colour

    @widgets.register("passes_on")
    def passes_on(ctx, *, kwargs: dict = {}):
        return library(size=2, **kwargs)

    @widgets.register("buggy")
    def buggy(ctx, *, size: int = 1, kwargs: dict = {}):
        return library(sise=size, **kwargs)  # a typo of the builder's own: not the user's doing

    assert widgets.build("passes_on", None, {"kwargs": {"colour": "blue"}}) == (2, "blue")
    with pytest.raises(UserError, match=r"widget passes_on: .*multiple values for keyword argument 'size'"):
        widgets.build("passes_on", None, {"kwargs": {"size": 3}})
    with pytest.raises(UserError, match="unexpected keyword argument 'shape'"):
        widgets.build("passes_on", None, {"kwargs": {"shape": "round"}})
    with pytest.raises(TypeError, match="unexpected keyword argument 'sise'") as caught:
        widgets.build("buggy", None, {"kwargs": {"colour": "blue"}})
    assert not isinstance(caught.value, UserError)


def test_the_table_of_shipped_modules_names_exactly_what_they_register():
    import importlib

    from instill.registry import BUILTIN_MODULES, DATASETS, MODELS, import_builtins

    import_builtins()
    for kind, registry in (("dataset", DATASETS), ("model", MODELS)):
        shipped = {e.name.split(":")[0] for e in registry.entries() if e.build.__module__.startswith("instill.")}
        assert set(BUILTIN_MODULES[kind]) == shipped, kind
        for name, module in BUILTIN_MODULES[kind].items():
            entry = registry.get(name if name not in ("timm", "torchvision") else f"{name}:x")
            assert entry.build.__module__ == importlib.import_module(f"instill.{module}").__name__, name
    from instill.stages import STAGES  # a stage is its main's module's

    shipped = {e.name for e in STAGES.entries() if e.build.main.__module__.startswith("instill.")}
    assert set(BUILTIN_MODULES["stage"]) == shipped
    for name, module in BUILTIN_MODULES["stage"].items():
        assert STAGES.get(name).build.main.__module__ == f"instill.{module}", name


def test_validating_a_digits_config_imports_no_other_shipped_module():
    import subprocess
    import sys

    code = ("import sys; from instill.cli import main; main('base', ['configs/vision_base_digits.yaml', "
            "'--validate']); print(sorted(m for m in sys.modules if m.startswith('instill.data.') "
            "or m.startswith('instill.models.')))")
    from tests.conftest import REPO

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True).stdout
    assert "instill.data.sequences" not in out and "instill.models.gpt2" not in out, out
    assert "instill.data.images" in out and "instill.models.vision" in out, out
