"""Image classifiers: a fully connected network, a small ConvNet, and any timm or torchvision model by name.

Every builder takes the dataset's ``info`` (``input_shape`` as (C, H, W), ``num_classes``) so a model is sized for
the configured resolution and class count. Inputs are (batch, C, H, W); outputs are (batch, classes) logits.
Module names are stable (``layers.0``, ``layers.1``, ..., ``head``) so that masks and activation capture can name them.
"""

from __future__ import annotations

import math
import os
from typing import Any, Literal, Mapping, Optional

import torch
from pydantic import confloat, conint
from torch import nn

from ..dataset_info import DatasetInfo
from ..errors import UserError, did_you_mean, require
from ..registry import MODELS

Activation = Literal["relu", "gelu", "tanh"]
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "tanh": nn.Tanh}


class FCN(nn.Module):
    """Flatten, then ``depth`` blocks of Linear (+ BatchNorm1d) + activation (+ dropout), then a linear head."""

    def __init__(self, in_features: int, num_classes: int, depth: int, width: int, batch_norm: bool,
                 dropout: float, activation: str):
        super().__init__()
        blocks, features = [], in_features
        for _ in range(depth):
            block = [nn.Linear(features, width)]
            block += [nn.BatchNorm1d(width)] if batch_norm else []
            block += [ACTIVATIONS[activation]()]
            block += [nn.Dropout(dropout)] if dropout else []
            blocks.append(nn.Sequential(*block))
            features = width
        self.layers = nn.Sequential(*blocks)
        self.head = nn.Linear(features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(x.flatten(1)))


@MODELS.register("fcn")
def fcn(info: DatasetInfo, *, depth: conint(ge=0) = 3, width: conint(ge=1) = 256, batch_norm: bool = False,
        dropout: confloat(ge=0, lt=1) = 0.0, activation: Activation = "relu") -> nn.Module:
    """Fully connected network on flattened pixels: deep (large ``depth``) or wide (large ``width``)."""
    return FCN(math.prod(info.input_shape), info.num_classes, depth, width, batch_norm, dropout, activation)


class ConvNet(nn.Module):
    """Conv blocks (3x3, BatchNorm, ReLU; stride 2 where asked to downsample early), global pooling, linear head."""

    def __init__(self, in_channels: int, num_classes: int, channels: list[int], strides: list[int],
                 batch_norm: bool):
        super().__init__()
        blocks, c_in = [], in_channels
        for c_out, stride in zip(channels, strides):
            block = [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=not batch_norm)]
            block += [nn.BatchNorm2d(c_out)] if batch_norm else []
            blocks.append(nn.Sequential(*block, nn.ReLU()))
            c_in = c_out
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.layers(x)).flatten(1))


@MODELS.register("convnet")
def convnet(info: DatasetInfo, *, channels: list[conint(ge=1)] = [32, 64, 64],
            strides: Optional[list[conint(ge=1, le=4)]] = None, batch_norm: bool = True) -> nn.Module:
    """A small ConvNet; ``strides`` defaults to 2 for every block (downsample early: cheap on a CPU)."""
    strides = strides if strides is not None else [2] * len(channels)
    if len(strides) != len(channels):
        raise UserError(f"{len(strides)} strides for {len(channels)} conv blocks")
    return ConvNet(info.input_shape[0], info.num_classes, channels, strides, batch_norm)


def _read_weights(weights_path: Optional[str], label: str) -> dict[str, torch.Tensor]:
    """The tensors of a local weights file (safetensors, or a state dict loaded with ``weights_only=True``)."""
    if weights_path is None:
        raise UserError(f"model {label}: pretrained: true needs weights_path (a local file; nothing downloads)")
    if not os.path.isfile(weights_path):
        raise UserError(f"model {label}: weights_path {weights_path} not found")
    try:
        if weights_path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(weights_path)
        return torch.load(weights_path, map_location="cpu", weights_only=True)
    except Exception as err:  # a truncated or foreign file
        raise UserError(f"model {label}: cannot read weights_path {weights_path} ({err.__class__.__name__})") from None


def _check_names(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor], weights_path: str,
                 label: str) -> list[str]:
    """The names whose shapes differ (sized for other data); a UserError when the file is of another architecture:
    names that do not match, or no tensor that fits."""
    missing, unexpected = [k for k in own if k not in state], [k for k in state if k not in own]
    resized = [k for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or len(resized) == len(own):
        raise UserError(f"model {label}: {weights_path} does not match the architecture "
                        f"(missing: {missing[:3]}, unexpected: {unexpected[:3]}, other shapes: {resized[:3]})")
    return resized


def _load_local_weights(model: nn.Module, pretrained: bool, weights_path: Optional[str], label: str) -> nn.Module:
    """Pretrained weights come from a local file only: nothing downloads at run time.

    Tensors whose shape differs (a head for other classes, a first layer for other channels) keep their fresh
    initialisation, as fine-tuning a pretrained model on new classes needs; the run says which they are. Names that
    do not match, or weights of which nothing fits, mean another architecture: a UserError.
    """
    if not pretrained:
        return model
    state = _read_weights(weights_path, label)
    own = model.state_dict()
    resized = _check_names(own, state, weights_path, label)
    model.load_state_dict({k: v for k, v in state.items() if k not in resized}, strict=False)
    if resized:
        print(f"model {label}: pretrained weights from {weights_path}, except {', '.join(resized)} "
              "(sized for other data: freshly initialised)")
    return model


def _sized_for_data(create, size_key: str, size, kwargs: dict, reserved: tuple[str, ...], label: str) -> nn.Module:
    """Build a library model sized by the data: classes and channels always, the input resolution where the
    architecture has one (ViTs and the like take ``size_key``; convolutional networks have no such keyword)."""
    clash = sorted(set(kwargs) & set(reserved))
    if clash:
        raise UserError(f"model {label}: kwargs.{clash[0]} is set from the data and the model's own keys; remove it")
    if size_key not in kwargs:
        try:
            return create(**{size_key: size}, **kwargs)
        except TypeError as err:
            if size_key not in str(err):
                raise
    return create(**kwargs)


def _check_library_model(library: str, known: list[str], build_on_meta: Any):
    """A ``check`` for a library's models: the name is the library's, and a weights file exists, reads, and names
    the architecture's tensors (the model is built on the meta device: no memory, no initialisation)."""

    def check(*, name: str, pretrained: bool = False, weights_path: Optional[str] = None, kwargs: dict = {}) -> None:
        if name not in known():
            raise UserError(f"model {library}:{name}: unknown {library} model" + did_you_mean(name, known()))
        if pretrained:
            state = _read_weights(weights_path, f"{library}:{name}")
            with torch.device("meta"):
                own = build_on_meta(name).state_dict()
            _check_names(own, state, weights_path, f"{library}:{name}")

    return check


def _timm_names() -> list[str]:
    require("timm", extra="vision", feature="model timm:<name>")
    import timm

    return timm.list_models()


def _torchvision_names() -> list[str]:
    require("torchvision", extra="vision", feature="model torchvision:<name>")
    import torchvision

    return torchvision.models.list_models(module=torchvision.models)


def _timm_on_meta(name: str) -> nn.Module:
    import timm

    return timm.create_model(name, pretrained=False)


def _torchvision_on_meta(name: str) -> nn.Module:
    import torchvision

    return torchvision.models.get_model(name, weights=None)


@MODELS.register("timm", prefix=True, check=_check_library_model("timm", _timm_names, _timm_on_meta))
def timm_model(info: DatasetInfo, *, name: str, pretrained: bool = False, weights_path: Optional[str] = None,
               kwargs: dict = {}) -> nn.Module:
    """``timm:<name>``: any timm architecture, sized for the data's channels and classes."""
    import timm

    known = _timm_names()
    if name not in known:
        raise UserError(f"model timm:{name}: unknown timm model" + did_you_mean(name, known))
    _, height, width = info.input_shape
    model = _sized_for_data(
        lambda **kw: timm.create_model(name, pretrained=False, num_classes=info.num_classes,
                                       in_chans=info.input_shape[0], **kw),
        "img_size", height if height == width else (height, width), kwargs,
        ("num_classes", "in_chans", "pretrained", "pretrained_cfg"), f"timm:{name}")
    return _load_local_weights(model, pretrained, weights_path, f"timm:{name}")


@MODELS.register("torchvision", prefix=True,
                 check=_check_library_model("torchvision", _torchvision_names, _torchvision_on_meta))
def torchvision_model(info: DatasetInfo, *, name: str, pretrained: bool = False, weights_path: Optional[str] = None,
                      kwargs: dict = {}) -> nn.Module:
    """``torchvision:<name>``: any torchvision classification model, sized for the data's channels and classes."""
    import torchvision

    known = _torchvision_names()
    if name not in known:
        raise UserError(f"model torchvision:{name}: unknown model" + did_you_mean(name, known))
    model = _sized_for_data(
        lambda **kw: torchvision.models.get_model(name, weights=None, num_classes=info.num_classes, **kw),
        "image_size", info.input_shape[1], kwargs, ("num_classes", "weights"), f"torchvision:{name}")
    _adapt_first_conv(model, info.input_shape[0])
    return _load_local_weights(model, pretrained, weights_path, f"torchvision:{name}")


def _adapt_first_conv(model: nn.Module, channels: int) -> None:
    """torchvision models are built for RGB: give the first convolution the data's channel count instead."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            if module.in_channels != channels:
                parent_name, _, attr = name.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                setattr(parent, attr, nn.Conv2d(channels, module.out_channels, module.kernel_size, module.stride,
                                                module.padding, module.dilation, module.groups,
                                                module.bias is not None, module.padding_mode))
            return


def check_accepts(model: nn.Module, info: DatasetInfo | Mapping[str, Any],
                  device: torch.device = torch.device("cpu")) -> None:
    """A dry forward pass on two zero samples, so a resolution or class count the model cannot take is a UserError.

    ``info``: a ``DatasetInfo`` or a mapping of its names."""
    info = DatasetInfo.of(info)
    shape = tuple(info.input_shape)
    dtype = torch.long if info.vocab_size else torch.float32
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros((2, *shape), dtype=dtype, device=device))
    except (RuntimeError, AssertionError, ValueError) as err:  # timm asserts on image sizes, torch raises
        reason = (str(err).splitlines() or [type(err).__name__])[0]
        raise UserError(f"the model cannot take inputs of shape {shape}: {reason}") from None
    finally:
        model.train(was_training)
    out = getattr(out, "logits", out)
    classes = info.num_classes
    if classes and isinstance(out, torch.Tensor) and out.shape[-1] != classes:
        raise UserError(f"the model's head gives {out.shape[-1]} outputs but the data has {classes} classes")
