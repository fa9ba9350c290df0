"""The stitching system's part of the Python API: stitch two of your own models and train the stitching layer."""

from __future__ import annotations

from typing import Iterable, Literal, Optional

import torch
from torch import nn

from ..errors import UserError, under_key
from ..train import device_of, input_target_pair, logits_of
from .init import INITS, check_fits, initialise, least_squares_stats, stitch_choice
from .pair import build_stitch
from .stitch import StitchedNet, StitchTransform, TargetBatch, agreement_metrics, freeze, stitch_target

__all__ = ["stitch_models", "StitchedNet", "StitchTransform"]


@torch.no_grad()
def _stitch_metrics(stitched: StitchedNet, end: nn.Module, loader: Iterable, device: torch.device
                    ) -> dict[str, float]:
    sums: dict[str, float] = {}
    n = 0
    for batch in loader:
        x, y = (t.to(device) for t in input_target_pair(batch))
        for key, value in agreement_metrics(stitched(x), end(x), y).items():
            sums[key] = sums.get(key, 0.0) + float(value)
        n += len(x)
    if n == 0:
        raise UserError("stitch_models: the evaluation loader yielded no samples")
    keys = ("acc", "end_acc", "agreement", "ce_to_end", "kl_to_end")
    return {key: sums[key] / n for key in keys}


def stitch_models(front: nn.Module, end: nn.Module, front_layer: str, end_layer: str, loader: Iterable, *,
                  transform: Literal["affine", "flatten"] = "affine", init: str = "ps_inv", rank: Optional[int] = None,
                  bias: bool = True, resize: str = "bilinear", target: str = "hard", temperature: float = 1.0,
                  epochs: int = 1, lr: float = 1e-3, eval_loader: Optional[Iterable] = None, seed: int = 0
                  ) -> tuple[StitchedNet, dict[str, float]]:
    """Stitch ``front`` up to ``front_layer`` into ``end`` from ``end_layer`` on, and train the stitching layer.

    The two models are split (``instill.stitching.stitch.Head`` / ``Tail``), a ``StitchTransform`` maps the front
    activation onto the end activation's shape, is initialised (``ps_inv``: the least-squares map from one pass over
    ``loader``) and then trained with Adam on ``target``'s loss while both models stay frozen.

    Args:
        front: the network that gives the first part; put in evaluation mode and frozen (``requires_grad`` off).
        end: the network that gives the rest; frozen the same way.
        front_layer: the module name in ``front`` to cut after.
        end_layer: the module name in ``end`` whose output the stitched activation replaces.
        loader: yields ``(inputs, targets)`` batches; the least-squares fit and the training use it.
        transform: ``affine`` (a 1x1 convolution / channel map shared over positions) or ``flatten``.
        init: a stitch initialisation (``instill list stitch_inits``; yours registered, or its import path).
        rank: restrict the channel map to this rank (``ps_inv`` then becomes reduced-rank regression).
        bias: learn a bias.
        resize: how a front map is brought onto the end's grid when their sizes differ.
        target: a stitch target (``instill list stitch_targets``; yours registered, or its import path) other than
            those on activations (``match``): ``hard`` (labels), ``soft_1``, ``soft_2``, ``soft_12``,
            ``soft_1_plus_2`` (the models' softened outputs).
        temperature: of the soft targets.
        epochs: training passes over ``loader`` (0: keep the initialisation).
        lr: Adam's learning rate.
        eval_loader: the batches the metrics are measured on (default ``loader``).
        seed: seeds the random inits.

    Returns:
        ``(stitched, metrics)``: the ``StitchedNet`` in evaluation mode (``stitched.transform`` holds the map) and
        ``{acc, end_acc, agreement, ce_to_end, kl_to_end}`` of the trained stitch on ``eval_loader``, the same with a
        ``before_`` prefix for the initialised one, and ``fit_r2`` (the R^2 of the trained map against the end
        activations on ``loader``) when a least-squares pass ran.

    Raises:
        UserError: an unknown layer (nearest names listed), activations no transform of this kind connects, an
            unknown init or target, an init the shapes do not allow, batches that are not ``(inputs, targets)``.
    """
    with under_key("stitch_models"):
        objective = stitch_target(target)
        initialisation = stitch_choice(INITS, init)
    if objective.on_activations:
        raise UserError(f"stitch_models: target {target} trains on activations alone; use the stitch stage for it")
    device = device_of(front)
    freeze(front), freeze(end)
    first = next(iter(loader), None)
    if first is None:
        raise UserError("stitch_models: the loader yielded no batches")
    sample = input_target_pair(first)[0][:4].to(device)
    with under_key("stitch_models"):
        pieces = build_stitch(front, end, front_layer, end_layer, sample, kind=transform, rank=rank, bias=bias,
                              resize=resize)
        stitch, head, end_head, tail = pieces.transform, pieces.head, pieces.end_head, pieces.tail
        check_fits(INITS, init, stitch.d_in, stitch.d_out)
    stats = None
    if initialisation.needs_stats:
        inputs = (input_target_pair(batch)[0].to(device) for batch in loader)
        stats = least_squares_stats(stitch, ((head(x), end_head(x)) for x in inputs))
    initialise(stitch, init, "identity", torch.Generator().manual_seed(seed), stats)
    stitched = StitchedNet(head, stitch, tail).to(device)
    evaluate_on = loader if eval_loader is None else eval_loader
    metrics = {f"before_{k}": v for k, v in _stitch_metrics(stitched.eval(), end, evaluate_on, device).items()}
    optimizer = torch.optim.Adam(stitch.parameters(), lr=lr)
    for _ in range(epochs):
        stitched.train()
        for batch in loader:
            x, y = (t.to(device) for t in input_target_pair(batch))
            with torch.no_grad():
                front_logits = logits_of(front(x)) if "front_logits" in objective.needs else None
                end_logits = logits_of(end(x)) if "end_logits" in objective.needs else None
                front_activation = head(x)
            transformed = stitch(front_activation)  # what stitched(x) computes, kept for the target
            loss = objective(TargetBatch(tail(transformed, x), y, front_logits, end_logits, transformed, None,
                                         temperature))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    metrics.update(_stitch_metrics(stitched.eval(), end, evaluate_on, device))
    if stats is not None:
        metrics["fit_r2"] = stats.r2(stitch.matrix().detach(), None if stitch.bias is None else stitch.bias.detach())
    return stitched, metrics
