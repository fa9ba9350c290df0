"""The task every stage trains and scores: the loss of an objective, accuracy and loss per split, shape bias."""

from __future__ import annotations

from typing import Any, Callable, Literal

import torch

from ..data.info import DatasetInfo
from ..data import Split, batches
from ..metrics import shape_bias
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
