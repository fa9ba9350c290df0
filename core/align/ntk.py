"""NTK-parameterised networks of the Align learning rules (Boopathy & Fiete 2022) and the Add-task ReLU RNN.

NTK parameterisation: every weight is drawn N(0, 1) and multiplied by 1/sqrt(fan_in) in the forward pass; biases
start at zero. ``parameterisation: standard`` draws N(0, 1/fan_in) and multiplies by 1 (the original's ``_adam``
variants). Optional batch norm uses the batch statistics of each unit, always (also at test time), without affine
parameters and eps 1e-6, exactly as the original: ``tf.nn.moments(x, [0])`` normalises every unit, for a conv map
every (channel, row, column), over the batch.

Layout, as the original: block l is ``[activation of the previous block's output] -> linear/conv -> batch norm``;
after the last block the activation, (CNN) global average pooling and a linear readout scaled 1/sqrt(width). The
block outputs z_l (post batch norm, pre activation) are where the learning rules of ``instill.align.rules`` tap the
network: ``model(x, tap=fn)`` replaces each z_l by ``fn(l, z_l)`` and the readout's input (after activation and
pooling) by ``fn(L, a)``, L the number of blocks. Module names: ``blocks.<l>.layer`` and ``head``.

Every layer can run with a fixed feedback matrix (``layer.feedback``): the forward value is unchanged, the gradient
to the layer's input goes through the feedback instead of the weight (feedback alignment, Align-prop).
"""

from __future__ import annotations

import math
from typing import Callable, Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import conint
from torch import nn

from ..dataset_info import DatasetInfo
from ..errors import UserError
from ..registry import MODELS

Tap = Callable[[int, torch.Tensor], torch.Tensor]
Parameterisation = Literal["ntk", "standard"]
ACTIVATIONS = {"relu": torch.relu, "tanh": torch.tanh}

# The original's shapes: (strides per conv layer) of its CIFAR-10, KMNIST and ImageNet networks (3x3 kernels).
CNN_SHAPES = {"cifar": [1, 1, 1, 2, 1, 2, 1], "kmnist": [1, 2, 2], "imagenet": [4, 2, 1, 2, 1, 2, 1]}
MAX_WIDTH = 65536


class _FeedbackLinear(torch.autograd.Function):
    """y = a W^T + b; the gradient to ``a`` goes through ``feedback`` in place of W (weights get their own)."""

    @staticmethod
    def forward(ctx, a, w, b, feedback):
        ctx.save_for_backward(a, feedback)
        return F.linear(a, w, b)

    @staticmethod
    def backward(ctx, g):
        a, feedback = ctx.saved_tensors
        grad_a = g @ feedback if ctx.needs_input_grad[0] else None
        grad_b = g.sum(0) if ctx.needs_input_grad[2] else None
        return grad_a, g.t() @ a, grad_b, None


class _FeedbackConv(torch.autograd.Function):
    """conv2d(a, W) + b; the gradient to ``a`` goes through the transposed conv with ``feedback``."""

    @staticmethod
    def forward(ctx, a, w, b, feedback, stride, padding):
        ctx.save_for_backward(a, w, feedback)
        ctx.stride, ctx.padding = stride, padding
        return F.conv2d(a, w, b, stride, padding)

    @staticmethod
    def backward(ctx, g):
        a, w, feedback = ctx.saved_tensors
        grad_a = (torch.nn.grad.conv2d_input(a.shape, feedback, g, ctx.stride, ctx.padding)
                  if ctx.needs_input_grad[0] else None)
        grad_w = torch.nn.grad.conv2d_weight(a, w.shape, g, ctx.stride, ctx.padding)
        grad_b = g.sum((0, 2, 3)) if ctx.needs_input_grad[2] else None
        return grad_a, grad_w, grad_b, None, None, None


class NTKLinear(nn.Module):
    """Linear layer with a raw weight (out, in) multiplied by ``scale`` in the forward pass."""

    def __init__(self, fan_in: int, out: int, parameterisation: Parameterisation = "ntk", bias: bool = True):
        super().__init__()
        std = 1.0 if parameterisation == "ntk" else 1 / math.sqrt(fan_in)
        self.scale = 1 / math.sqrt(fan_in) if parameterisation == "ntk" else 1.0
        self.init_std = std  # feedback matrices are drawn like the weight
        self.weight = nn.Parameter(torch.randn(out, fan_in) * std)
        self.bias = nn.Parameter(torch.zeros(out)) if bias else None
        self.feedback: Optional[torch.Tensor] = None  # raw, distributed as the weight; scaled like it

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        w = self.weight * self.scale
        if self.feedback is None:
            return F.linear(a, w, self.bias)
        return _FeedbackLinear.apply(a, w, self.bias, self.feedback * self.scale)


class NTKConv2d(nn.Module):
    """k x k convolution (SAME padding for odd k) with a raw weight multiplied by 1/sqrt(k*k*C_in) (NTK)."""

    def __init__(self, c_in: int, c_out: int, kernel: int, stride: int, parameterisation: Parameterisation = "ntk"):
        super().__init__()
        fan_in = kernel * kernel * c_in
        std = 1.0 if parameterisation == "ntk" else 1 / math.sqrt(fan_in)
        self.scale = 1 / math.sqrt(fan_in) if parameterisation == "ntk" else 1.0
        self.init_std = std
        self.weight = nn.Parameter(torch.randn(c_out, c_in, kernel, kernel) * std)
        self.bias = nn.Parameter(torch.zeros(c_out))
        self.stride, self.padding = stride, kernel // 2
        self.feedback: Optional[torch.Tensor] = None

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        w = self.weight * self.scale
        if self.feedback is None:
            return F.conv2d(a, w, self.bias, self.stride, self.padding)
        return _FeedbackConv.apply(a, w, self.bias, self.feedback * self.scale, self.stride, self.padding)


def batch_stat_norm(h: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Every unit normalised over the batch with the batch's own statistics (no affine, no running averages)."""
    mean = h.mean(0, keepdim=True)
    var = h.var(0, unbiased=False, keepdim=True)
    return (h - mean) * torch.rsqrt(var + eps)


class Block(nn.Module):
    """[activation] -> layer -> [batch-statistics norm]."""

    def __init__(self, layer: nn.Module, activate_input: bool, batch_norm: bool, activation: str):
        super().__init__()
        self.layer, self.activate_input, self.batch_norm = layer, activate_input, batch_norm
        self.activation = activation

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        a = ACTIVATIONS[self.activation](z) if self.activate_input else z
        h = self.layer(a)
        return batch_stat_norm(h) if self.batch_norm else h


class NTKNet(nn.Module):
    """Blocks, activation, (global average pooling), linear readout ``head``; see the module docstring."""

    live_params: tuple[str, ...] = ()  # parameters whose current value the rules' initial network uses

    def __init__(self, blocks: list[Block], head: NTKLinear, conv: bool, activation: str):
        super().__init__()
        self.blocks, self.head, self.conv, self.activation = nn.ModuleList(blocks), head, conv, activation

    def forward(self, x: torch.Tensor, tap: Optional[Tap] = None) -> torch.Tensor:
        z = x if self.conv else x.flatten(1)
        for i, block in enumerate(self.blocks):
            z = block(z)
            if tap is not None:
                z = tap(i, z)
        a = ACTIVATIONS[self.activation](z)
        a = a.mean((2, 3)) if self.conv else a
        if tap is not None:  # the readout's input (activation, pooled) is tapped too, as index len(blocks)
            a = tap(len(self.blocks), a)
        return self.head(a)

    def readout_parameters(self) -> list[str]:
        return ["head.weight", "head.bias"]

    def layer_names(self) -> list[str]:
        """The weight layers in forward order (the names alignment scores use)."""
        return [f"blocks.{i}.layer" for i in range(len(self.blocks))] + ["head"]


Width = conint(ge=1, le=MAX_WIDTH)


@MODELS.register("ntk_mlp")
def ntk_mlp(info: DatasetInfo, *, depth: conint(ge=1, le=64) = 3, width: Width = 256, batch_norm: bool = True,
            activation: Literal["relu", "tanh"] = "relu", parameterisation: Parameterisation = "ntk") -> NTKNet:
    """NTK-parameterised MLP: ``depth`` hidden layers of ``width`` units (batch-statistics norm), linear readout."""
    fan_in, blocks = math.prod(info.input_shape), []
    for i in range(depth):
        blocks.append(Block(NTKLinear(fan_in, width, parameterisation), i > 0, batch_norm, activation))
        fan_in = width
    return NTKNet(blocks, NTKLinear(width, info.num_classes, parameterisation), False, activation)


@MODELS.register("ntk_cnn")
def ntk_cnn(info: DatasetInfo, *, shape: Literal["cifar", "kmnist", "imagenet", "custom"] = "kmnist",
            strides: Optional[list[conint(ge=1, le=8)]] = None, width: Width = 64, kernel: conint(ge=1, le=11) = 3,
            batch_norm: bool = True, activation: Literal["relu", "tanh"] = "relu",
            parameterisation: Parameterisation = "ntk") -> NTKNet:
    """NTK-parameterised CNN: 3x3 convs of ``width`` channels with the original's strides (``shape``: cifar 7
    layers, kmnist 3, imagenet 7; ``custom`` takes ``strides``), batch-statistics norm, global average pooling,
    linear readout."""
    if (shape == "custom") != (strides is not None):
        raise UserError("strides: give strides exactly when shape is custom")
    if kernel % 2 == 0:
        raise UserError(f"kernel {kernel} is even; SAME padding needs an odd kernel")
    if len(info.input_shape) != 3:
        raise UserError(f"model ntk_cnn needs images (C, H, W); the data give shape {info.input_shape}")
    c_in, blocks = info.input_shape[0], []
    for i, stride in enumerate(strides if shape == "custom" else CNN_SHAPES[shape]):
        blocks.append(Block(NTKConv2d(c_in, width, kernel, stride, parameterisation), i > 0, batch_norm, activation))
        c_in = width
    return NTKNet(blocks, NTKLinear(width, info.num_classes, parameterisation), True, activation)


class AddRNN(nn.Module):
    """The Add task's ReLU RNN: h_t = relu(W_ih x_t + W_hh h_{t-1}/sqrt(n) + b), y_t = W_ho h_t/sqrt(n) + b_o.

    The initial state is trainable, one row per batch slot (``batch_slots``), as the original; a batch must have
    exactly that many sequences. ``model(x, tap=fn)`` replaces every state h_t (t = 0 is the initial state) by
    ``fn(t, h_t)``, in both the recurrence and the readout (``tap_readout=False``: the recurrence only).
    Inputs (batch, T) in {0, 1}; outputs (batch, T).
    """

    live_params = ("init_state",)  # the original's linearised copy starts from the trained initial state

    def __init__(self, hidden: int, batch_slots: int, parameterisation: Parameterisation = "ntk"):
        super().__init__()
        self.input = NTKLinear(1, hidden, parameterisation)
        self.recurrent = NTKLinear(hidden, hidden, parameterisation, bias=False)
        self.head = NTKLinear(hidden, 1, parameterisation)
        self.init_state = nn.Parameter(torch.zeros(batch_slots, hidden))

    def forward(self, x: torch.Tensor, tap: Optional[Tap] = None, tap_readout: bool = True) -> torch.Tensor:
        """``tap_readout=False``: the readout reads the untapped states (the tap acts on the recurrence only)."""
        if x.shape[0] != self.init_state.shape[0]:
            raise UserError(f"add_rnn: a batch of {x.shape[0]} sequences, but the trainable initial state has "
                            f"{self.init_state.shape[0]} slots (set the batch sizes to model.batch_slots)")
        h = self.init_state if tap is None else tap(0, self.init_state)
        outputs = []
        for t in range(x.shape[1]):
            raw = torch.relu(self.input(x[:, t:t + 1]) + self.recurrent(h))
            h = raw if tap is None else tap(t + 1, raw)
            outputs.append(self.head(h if tap_readout else raw))
        return torch.cat(outputs, 1)

    def readout_parameters(self) -> list[str]:
        return ["head.weight", "head.bias", "init_state"]

    def layer_names(self) -> list[str]:
        return ["input", "recurrent", "head"]


@MODELS.register("add_rnn")
def add_rnn(info: DatasetInfo, *, width: Width = 64, batch_slots: conint(ge=1) = 50,
            parameterisation: Parameterisation = "ntk") -> AddRNN:
    """The Add task's ReLU RNN of ``width`` units with a trainable initial state per batch slot."""
    return AddRNN(width, batch_slots, parameterisation)
