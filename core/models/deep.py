"""The "untrainable" image targets of "Training the Untrainable": a deep FCN, a wide FCN, and a ResNet without skips.

Inputs are (batch, C, H, W) images, outputs (batch, classes) logits.

* ``deep_fcn`` and ``wide_fcn`` are presets of ``fcn`` (``instill.models.vision.FCN``), so their module names are its
  names: ``layers.0`` .. ``layers.{depth-1}`` (each a Sequential of ``0`` Linear, ``1`` BatchNorm1d when
  ``batch_norm``, then the activation and dropout), and ``head``.
* ``noresnet`` keeps a ResNet's layout (ResNet-18, -34 or -50 blocks and widths) and removes its residual
  connections and downsampling shortcuts: a plain deep CNN, the paper's "Deep ConvNet" (NoResNet-50). With
  ``residual: true`` it is the ordinary ResNet of the same layout, a guide sized for small images. Names: ``stem``
  (``conv``, ``bn``, ``relu``; ``maxpool`` for the ImageNet stem), ``layers.0`` .. ``layers.{blocks-1}`` (the
  blocks of all stages in order, each with ``conv1``, ``bn1``, ``conv2``, ``bn2`` (+ ``conv3``, ``bn3`` for
  bottlenecks), ``relu``, and ``shortcut`` where a residual block changes shape), ``pool``, ``head``. A block's
  output is its final ReLU's.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Literal

import torch
from pydantic import confloat, conint
from torch import nn

from ..dataset_info import DatasetInfo
from .vision import Activation, fcn
from ..registry import MODELS

# depth -> (block kind, blocks per stage), as torchvision's resnet18 / resnet34 / resnet50
LAYOUTS: dict[int, tuple[str, tuple[int, ...]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
}
EXPANSION = {"basic": 1, "bottleneck": 4}


@MODELS.register("deep_fcn")
def deep_fcn(info: DatasetInfo, *, depth: conint(ge=1) = 24, width: conint(ge=1) = 256, batch_norm: bool = True,
             dropout: confloat(ge=0, lt=1) = 0.1, activation: Activation = "relu") -> nn.Module:
    """Deep FCN: many narrow Linear (+ BatchNorm) + ReLU + Dropout blocks on flattened pixels.

    Paper: 48 blocks (2048 then 1024 wide), BatchNorm, dropout 0.1 on ImageNet; default: 24 x 256 (CPU scale).
    """
    return fcn(info, depth=depth, width=width, batch_norm=batch_norm, dropout=dropout, activation=activation)


@MODELS.register("wide_fcn")
def wide_fcn(info: DatasetInfo, *, depth: conint(ge=1) = 3, width: conint(ge=1) = 2048, batch_norm: bool = True,
             dropout: confloat(ge=0, lt=1) = 0.0, activation: Activation = "relu") -> nn.Module:
    """Wide FCN: a few very wide Linear + BatchNorm + ReLU blocks. Paper: 3 x 8192; default 3 x 2048 (CPU scale)."""
    return fcn(info, depth=depth, width=width, batch_norm=batch_norm, dropout=dropout, activation=activation)


def _norm(channels: int, batch_norm: bool) -> nn.Module:
    return nn.BatchNorm2d(channels) if batch_norm else nn.Identity()


class Block(nn.Module):
    """A ResNet block (basic: two 3x3 convs; bottleneck: 1x1, 3x3, 1x1) with or without its residual connection."""

    def __init__(self, kind: str, c_in: int, width: int, stride: int, residual: bool, batch_norm: bool):
        super().__init__()
        c_out = width * EXPANSION[kind]
        if kind == "basic":
            shapes = [(c_in, width, 3, stride), (width, width, 3, 1)]
        else:
            shapes = [(c_in, width, 1, 1), (width, width, 3, stride), (width, c_out, 1, 1)]
        for i, (a, b, k, s) in enumerate(shapes, start=1):
            self.add_module(f"conv{i}", nn.Conv2d(a, b, k, stride=s, padding=k // 2, bias=not batch_norm))
            self.add_module(f"bn{i}", _norm(b, batch_norm))
        self.count = len(shapes)
        self.relu = nn.ReLU()
        self.residual = residual
        if residual and (stride != 1 or c_in != c_out):
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=not batch_norm),
                                          _norm(c_out, batch_norm))
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x
        for i in range(1, self.count + 1):
            h = getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(h))
            if i < self.count:
                h = self.relu(h)
        return self.relu(h + self.shortcut(x) if self.residual else h)


class NoResNet(nn.Module):
    """A ResNet layout whose blocks may drop their residual connections: (batch, C, H, W) -> (batch, classes)."""

    def __init__(self, in_channels: int, num_classes: int, depth: int, width: int, residual: bool,
                 batch_norm: bool, stem: str):
        super().__init__()
        kind, stages = LAYOUTS[depth]
        if stem == "imagenet":  # 7x7 stride 2 and a max-pool: 4x smaller maps, as torchvision
            parts = [("conv", nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=not batch_norm)),
                     ("bn", _norm(width, batch_norm)), ("relu", nn.ReLU()), ("maxpool", nn.MaxPool2d(3, 2, 1))]
        else:  # small images: one 3x3 conv at full resolution, as the CIFAR ResNets
            parts = [("conv", nn.Conv2d(in_channels, width, 3, padding=1, bias=not batch_norm)),
                     ("bn", _norm(width, batch_norm)), ("relu", nn.ReLU())]
        self.stem = nn.Sequential(OrderedDict(parts))
        blocks, c_in = [], width
        for stage, count in enumerate(stages):
            for i in range(count):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(Block(kind, c_in, width * 2**stage, stride, residual, batch_norm))
                c_in = width * 2**stage * EXPANSION[kind]
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.layers(self.stem(x))).flatten(1))


@MODELS.register("noresnet")
def noresnet(info: DatasetInfo, *, depth: Literal[18, 34, 50] = 18, width: conint(ge=1) = 64, residual: bool = False,
             batch_norm: bool = True, stem: Literal["small", "imagenet"] = "small") -> nn.Module:
    """ResNet-``depth`` layout without residual connections (the paper's Deep ConvNet); ``residual: true`` keeps them.

    ``width`` is the first stage's channels (64 in ResNets; stages double it). ``stem: small`` keeps full
    resolution for small images (three stride-2 stages: 32 px -> 4 px); ``imagenet`` is torchvision's stem.
    """
    return NoResNet(info.input_shape[0], info.num_classes, depth, width, residual, batch_norm, stem)
