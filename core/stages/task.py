"""The task every stage trains and scores: the loss of an objective, accuracy and loss per split, shape bias."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch

from ..dataset_info import DatasetInfo
from ..data import Split, batches
from ..run import TIMING_PREFIX
from ..train import classification_loss, evaluate_classification, logits_of, predict

LossScope = Literal["answer", "sequence"]


def make_loss(scope: LossScope) -> Callable[[torch.nn.Module, Any], tuple[torch.Tensor, dict[str, float]]]:
    """The task loss of an Objective: ``answer`` scores the labelled positions (an image's class, the arithmetic
    answer); ``sequence`` is the causal-LM loss over every next token of the input, as the original math code."""

    def loss(model, batch):
        x, y = batch
        logits = logits_of(model(x))
        if scope == "sequence":
            return classification_loss(logits[:, :-1], x[:, 1:]), {}
        return classification_loss(logits, y), {}

    return loss


def evaluate_task(model: torch.nn.Module, splits: dict[str, Split], info: DatasetInfo, batch_size: int,
                  device: torch.device) -> dict[str, float]:
    """Accuracy and loss per split; shape bias (overall and per class) for each cue-conflict pair in ``info``."""
    pairs = info.cue_conflict_pairs
    metrics = evaluate_classification(model, {k: v for k, v in splits.items() if k not in pairs.values()},
                                      batch_size, device)
    for shape_set, texture_set in pairs.items():
        if shape_set not in splits or texture_set not in splits:
            continue
        pred = torch.cat([predict(model, x, batch_size, device) for x, _ in batches(splits[shape_set], batch_size)])
        bias = shape_bias(pred, splits[shape_set].y, splits[texture_set].y, info.num_classes)
        prefix = "" if shape_set == "cue_conflict" else f"{shape_set}_"
        metrics[f"{prefix}shape_bias"] = bias.overall
        metrics[f"{texture_set}_acc"] = bias.texture_accuracy
        names = info.class_names or [str(c) for c in range(info.num_classes)]
        metrics.update({f"{prefix}shape_bias/{name}": value for name, value in zip(names, bias.per_class)})
    return metrics


def summary_metrics(result_row: dict[str, Any]) -> dict[str, Any]:
    """The numeric figures of a metrics row, without timing columns."""
    return {k: v for k, v in result_row.items() if isinstance(v, (int, float)) and not k.startswith(TIMING_PREFIX)}


# ---------------------------------------------------------------------------------------------------------------
# Shape bias (Geirhos et al. 2019): the share of shape decisions on cue-conflict images

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
