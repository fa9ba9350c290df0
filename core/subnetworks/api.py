"""The subnetworks system's part of the Python API: find a subnetwork, save and load it, transplant it."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional, Sequence

import torch
from torch import nn

from ..errors import UserError
from ..train import device_of, input_target_pair, logits_of
from .masks import MaskConfig, MaskedModel, load_mask, mask_density
from .transplant import CONDITIONS as TRANSFER_CONDITIONS
from .transplant import Transplant, transplant

__all__ = ["MaskConfig", "MaskedModel", "find_subnetwork", "load_mask", "mask_density", "transplant", "Transplant",
           "TRANSFER_CONDITIONS"]


def _cross_entropy(output: Any, target: torch.Tensor) -> torch.Tensor:
    logits = logits_of(output)
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1),
                                       ignore_index=-100)


def find_subnetwork(model: nn.Module, loader: Iterable, *, layers: Sequence[str] = ("Linear",),
                    method: str = "continuous_sparsification", epochs: int = 5, lr: float = 0.01,
                    l0_lambda: float = 1e-6,
                    loss_fn: Optional[Callable[[Any, torch.Tensor], torch.Tensor]] = None,
                    **mask_options: Any) -> MaskedModel:
    """Train a mask over ``model``'s weights that keeps the subnetwork doing the task ``loader`` shows.

    The mask logits train with AdamW on ``loss_fn(model output, targets) + l0_lambda * L0(mask)`` while the
    continuous-sparsification temperature anneals over ``epochs``; ``magnitude`` masks train nothing. The model
    itself is frozen (``requires_grad`` off) and kept in evaluation mode; its weights never change.

    Args:
        model: a trained network; batches go to the device its parameters are on.
        loader: yields ``(inputs, targets)`` batches (a ``torch.utils.data.DataLoader``, or any iterable).
        layers: what to mask: layer types (``Linear``, ``Conv2d``, ``Conv1D``, ``Embedding``, ...), globs over module
            names (``layers.*``) or over parameter names (``*.in_proj_weight``).
        method: a mask method: ``continuous_sparsification``, ``hard_concrete``, ``magnitude``, or one of your own
            (registered, or its import path ``pkg.module:Method``); ``instill list mask_methods``.
        epochs: passes over ``loader``.
        lr: AdamW learning rate of the mask logits.
        l0_lambda: weight of the L0 (density) penalty: larger gives sparser masks.
        loss_fn: ``loss_fn(output, targets)``; default cross-entropy on the output's logits (-100 targets ignored).
        **mask_options: further ``MaskConfig`` fields (``unit``, ``mask_bias``, ``final_temp``, ``prune_fraction``,
            ``method_options`` for a method of your own, ...).

    Returns:
        The trained ``MaskedModel`` in evaluation mode: ``hard_masks()`` gives ``{parameter name: bool tensor}``,
        ``save(directory)`` writes the mask artifact that ``load_mask`` reads, and calling it runs the subnetwork.

    Raises:
        UserError: an unknown method or option, a layer selection that matches no weight, or batches that are not
            ``(inputs, targets)`` pairs.
    """
    try:
        config = MaskConfig(layers=tuple(layers), method=method, l0_lambda=l0_lambda, **mask_options)
    except TypeError as err:
        raise UserError(f"find_subnetwork: {err}") from None
    loss_fn = loss_fn or _cross_entropy
    device = device_of(model)
    masked = MaskedModel(model, config).to(device)
    if masked.method.trainable:
        optimizer = torch.optim.AdamW(masked.logits.parameters(), lr=lr)
        for epoch in range(epochs):
            masked.set_epoch(epoch, epochs)
            masked.train()
            for batch in loader:
                x, y = input_target_pair(batch)
                loss = loss_fn(masked(x.to(device)), y.to(device)) + masked.penalty()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    return masked.eval()
