"""Evaluation metrics that need more than an accuracy: the shape bias of Geirhos et al. (2019)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class ShapeBias:
    """Shape bias on cue-conflict images: shape decisions / (shape + texture decisions).

    Images whose shape and texture class agree are left out (the standard protocol): they cannot tell the cues
    apart. ``per_class[c]`` groups the images by shape class c; it is NaN where the model made no shape or texture
    decision on that class.
    """

    overall: float
    per_class: list[float]
    shape_decisions: int
    texture_decisions: int
    images: int  # cue-conflict images counted (shape class != texture class)

    @property
    def shape_accuracy(self) -> float:
        return self.shape_decisions / self.images if self.images else math.nan

    @property
    def texture_accuracy(self) -> float:
        return self.texture_decisions / self.images if self.images else math.nan


def shape_bias(pred: torch.Tensor, shape_label: torch.Tensor, texture_label: torch.Tensor,
               num_classes: int) -> ShapeBias:
    """Overall and per-shape-class shape bias of predicted classes ``pred`` (N,) on cue-conflict images."""
    if not pred.shape == shape_label.shape == texture_label.shape:
        raise ValueError(f"pred, shape_label and texture_label differ in shape: "
                         f"{tuple(pred.shape)}, {tuple(shape_label.shape)}, {tuple(texture_label.shape)}")
    conflict = shape_label != texture_label
    pred, shape_label, texture_label = pred[conflict], shape_label[conflict], texture_label[conflict]
    by_shape = (pred == shape_label).long()
    by_texture = (pred == texture_label).long()
    shape_per_class = torch.zeros(num_classes, dtype=torch.long).scatter_add_(0, shape_label, by_shape)
    texture_per_class = torch.zeros(num_classes, dtype=torch.long).scatter_add_(0, shape_label, by_texture)
    return ShapeBias(
        overall=_ratio(int(by_shape.sum()), int(by_texture.sum())),
        per_class=[_ratio(int(s), int(t)) for s, t in zip(shape_per_class, texture_per_class)],
        shape_decisions=int(by_shape.sum()),
        texture_decisions=int(by_texture.sum()),
        images=int(conflict.sum()),
    )


def _ratio(shape: int, texture: int) -> float:
    return shape / (shape + texture) if shape + texture else math.nan
