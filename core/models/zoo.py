"""The CIFAR model zoo of Dr. Frankenstein (Csiszárik et al. 2021): Tiny10, NBN-Tiny10, LeNet and ResNet-20 of width k.

Every builder is sized by the data facts (``info``: ``input_shape`` as (C, H, W), ``num_classes``), never by
instantiating a dataset. Module names are the original's (``conv1``, ``bn1``, ..., ``fc``; ``layer1.0.bn2``,
``layer2.0.downsample.0``, ...), so the weights its authors trained load with ``strict=True`` (see
``instill.compare.sources.load_weights_file``); its stitchable layers (``bn1`` .. ``bn8`` of Tiny10: after the batch
norm,
before the ReLU) are named the same way. Two deliberate differences that change no state-dict key: every ReLU is
its own module and none works in place (the original's ``nn.ReLU(inplace=True)`` in ResNet blocks overwrites the
batch norm's output that a forward hook captured), and the residual addition is a module (``add``) so that it can
be captured by name.

Inputs are expected standardised with the CIFAR statistics (``data.natural.CIFAR_MEAN``, ``CIFAR_STD``), as in
the original.
"""

from __future__ import annotations

import torch
from pydantic import conint
from torch import nn

from ..dataset_info import DatasetInfo
from ..errors import UserError
from ..registry import MODELS


# (out channels, kernel, stride) of Tiny10's eight convolutions; no padding anywhere.
TINY10_LAYERS = ((16, 3, 1), (16, 3, 1), (32, 3, 2), (32, 3, 1), (32, 3, 1), (64, 3, 2), (64, 3, 1), (64, 1, 1))


def _conv_out(size: int, kernel: int, stride: int, padding: int = 0) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def _check_resolution(label: str, info: DatasetInfo, minimum: int) -> None:
    shape = tuple(info.input_shape)
    if len(shape) != 3:
        raise UserError(f"model {label}: needs images (channels, height, width), the data give shape {shape}")
    if min(shape[1:]) < minimum:
        raise UserError(f"model {label}: needs images of at least {minimum}x{minimum} pixels, the data give "
                        f"{shape[1]}x{shape[2]}")


class Tiny10(nn.Module):
    """Eight convolutions (conv -> BN -> ReLU; ``batch_norm=False``: conv -> ReLU), global average pooling, fc."""

    def __init__(self, in_channels: int, num_classes: int, batch_norm: bool = True):
        super().__init__()
        self.batch_norm = batch_norm
        c_in = in_channels
        for i, (c_out, kernel, stride) in enumerate(TINY10_LAYERS, start=1):
            setattr(self, f"conv{i}", nn.Conv2d(c_in, c_out, kernel, stride=stride))
            if batch_norm:
                setattr(self, f"bn{i}", nn.BatchNorm2d(c_out))
            setattr(self, f"relu{i}", nn.ReLU())
            c_in = c_out
        self.fc = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i in range(1, len(TINY10_LAYERS) + 1):
            x = getattr(self, f"conv{i}")(x)
            if self.batch_norm:
                x = getattr(self, f"bn{i}")(x)
            x = getattr(self, f"relu{i}")(x)
        return self.fc(x.mean(dim=(-2, -1)))


def _tiny10_min_size() -> int:
    """The smallest input side that leaves every Tiny10 convolution at least one output pixel."""
    size = 1
    while True:
        side = size
        for _, kernel, stride in TINY10_LAYERS:
            side = _conv_out(side, kernel, stride)
        if side >= 1:
            return size
        size += 1


@MODELS.register("tiny10")
def tiny10(info: DatasetInfo) -> nn.Module:
    """Tiny10 (the original's ``tiny10``): 8 unpadded convolutions 16,16,32s2,32,32,64s2,64,64(1x1) with batch norm;
    layers ``bn1`` .. ``bn8`` are 16x30x30 ... 64x2x2 on 32x32 inputs."""
    _check_resolution("tiny10", info, _tiny10_min_size())
    return Tiny10(info.input_shape[0], info.num_classes, batch_norm=True)


@MODELS.register("nbn_tiny10")
def nbn_tiny10(info: DatasetInfo) -> nn.Module:
    """Tiny10 without batch norm (the original's ``nbn_tiny10``)."""
    _check_resolution("nbn_tiny10", info, _tiny10_min_size())
    return Tiny10(info.input_shape[0], info.num_classes, batch_norm=False)


class LeNet(nn.Module):
    """conv 6@5x5 -> ReLU -> maxpool 2 -> conv 16@5x5 -> ReLU -> maxpool 2 -> fc 120 -> fc 84 -> fc classes."""

    def __init__(self, in_channels: int, num_classes: int, height: int, width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 6, 5)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)
        side = lambda s: (_conv_out(s, 5, 1) // 2 - 4) // 2  # noqa: E731 - conv, pool, conv, pool
        self.fc1 = nn.Linear(16 * side(height) * side(width), 120)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(120, 84)
        self.relu4 = nn.ReLU()
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu1(self.conv1(x)))
        x = self.pool2(self.relu2(self.conv2(x)))
        x = self.relu3(self.fc1(x.flatten(1)))
        return self.fc3(self.relu4(self.fc2(x)))


@MODELS.register("lenet")
def lenet(info: DatasetInfo) -> nn.Module:
    """LeNet-5 with ReLU and max pooling (the original's ``lenet``); fc1 is sized by the resolution (400 inputs at
    32x32)."""
    _check_resolution("lenet", info, 16)
    _, height, width = info.input_shape
    return LeNet(info.input_shape[0], info.num_classes, height, width)


class Add(nn.Module):
    """``x + y`` as a module, so that the residual sum can be captured or split at by name."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return x + y


class BasicBlock(nn.Module):
    """conv3x3 -> BN -> ReLU -> conv3x3 -> BN, plus the shortcut (1x1 conv + BN where the shape changes), ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(c_out))
        self.add = Add()
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.relu2(self.add(out, shortcut))


class ResNet20(nn.Module):
    """CIFAR ResNet-20: 3x3 stem of 16k channels, three stages of three BasicBlocks (16k, 32k, 64k; stride 2 at the
    start of stages 2 and 3), global average pooling, fc."""

    def __init__(self, in_channels: int, num_classes: int, width: int):
        super().__init__()
        c = 16 * width
        self.conv1 = nn.Conv2d(in_channels, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU()
        stages, c_in = [], c
        for stage, c_out in enumerate((c, 2 * c, 4 * c)):
            blocks = [BasicBlock(c_in if i == 0 else c_out, c_out, 2 if stage and i == 0 else 1) for i in range(3)]
            stages.append(nn.Sequential(*blocks))
            c_in = c_out
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)
        for module in self.modules():  # the original's initialisation
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))


@MODELS.register("resnet20")
def resnet20(info: DatasetInfo, *, width: conint(ge=1, le=64) = 1) -> nn.Module:
    """CIFAR ResNet-20 of width multiplier ``width`` (the original's ``resnet20_w{k}``; 272,474 parameters at k=1
    with 10 classes)."""
    _check_resolution("resnet20", info, 4)
    return ResNet20(info.input_shape[0], info.num_classes, width)
