"""Library image models sized by the data: resolution, channels, classes, and pretrained weights for other data."""

from __future__ import annotations

import pytest
import torch

from instill.errors import UserError
from instill.models.vision import check_accepts
from instill.registry import MODELS


def _info(channels: int, size: int, classes: int) -> dict:
    return {"input_shape": (channels, size, size), "num_classes": classes}


@pytest.mark.parametrize("name, info", [
    ("timm:vit_tiny_patch16_224", _info(3, 32, 6)),     # a fixed-size architecture takes the data's resolution
    ("torchvision:vit_b_16", _info(3, 32, 6)),
    ("torchvision:efficientnet_b0", _info(1, 28, 4)),  # first convolution not named conv1: still one channel
])
def test_library_models_are_sized_for_the_data(name, info):
    model = MODELS.build(name, info, {})
    check_accepts(model, info)


def test_a_resolution_fixed_by_the_user_is_checked():
    info = _info(3, 32, 6)
    model = MODELS.build("timm:vit_tiny_patch16_224", info, {"kwargs": {"img_size": 224}})
    with pytest.raises(UserError, match="cannot take inputs of shape"):
        check_accepts(model, info)


@pytest.mark.parametrize("name, key", [("timm:resnet18", "num_classes"), ("timm:resnet18", "in_chans"),
                                       ("torchvision:resnet18", "num_classes"), ("torchvision:resnet18", "weights")])
def test_keys_the_data_sets_cannot_be_given_as_kwargs(name, key):
    with pytest.raises(UserError, match=f"kwargs.{key} is set from the data"):
        MODELS.build(name, _info(3, 32, 6), {"kwargs": {key: 10}})


@pytest.mark.parametrize("name, head", [("torchvision:resnet18", "fc"), ("timm:resnet18", "fc")])
def test_pretrained_weights_for_other_classes_keep_all_but_the_head(tmp_path, capsys, name, head):
    source = MODELS.build(name, _info(3, 32, 1000), {})  # as if trained on ImageNet
    torch.save(source.state_dict(), tmp_path / "imagenet.pt")
    model = MODELS.build(name, _info(3, 32, 16), {"pretrained": True, "weights_path": str(tmp_path / "imagenet.pt")})
    assert f"except {head}.weight, {head}.bias" in capsys.readouterr().out
    mine, theirs = model.state_dict(), source.state_dict()
    assert mine[f"{head}.weight"].shape == (16, 512)
    assert all(torch.equal(mine[k], theirs[k]) for k in mine if not k.startswith(f"{head}."))


def test_unreadable_pretrained_weights_are_a_user_error(tmp_path):
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="cannot read weights_path"):
        MODELS.build("timm:resnet18", _info(3, 32, 6), {"pretrained": True, "weights_path": str(broken)})


def test_a_pretrained_model_config_rebuilds_fresh_without_its_weights_file(tmp_path):
    from instill.models import build_fresh

    info = _info(3, 32, 6)
    source = MODELS.build("timm:resnet18", info, {})
    torch.save(source.state_dict(), tmp_path / "w.pt")
    model_cfg = {"name": "timm:resnet18", "pretrained": True, "weights_path": str(tmp_path / "w.pt"), "kwargs": {}}
    (tmp_path / "w.pt").unlink()  # a later stage reads the trained weights from the run, or wants fresh ones
    fresh = build_fresh(model_cfg, info)
    assert not torch.equal(fresh.state_dict()["conv1.weight"], source.state_dict()["conv1.weight"])
