"""The subnetworks system's part of the Python API: find a subnetwork, save and load it, ablate it, transplant it."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import torch
from torch import nn

from ..errors import UserError
from ..train import device_of, input_target_pair, logits_of, score_batches
from .ablations import MODES as ABLATION_MODES
from .ablations import Ablations, run_ablations
from .masks import MaskConfig, MaskedModel, load_mask, mask_density, read_mask_meta
from .transplant import CONDITIONS as TRANSFER_CONDITIONS
from .transplant import Transplant, transplant

__all__ = ["MaskConfig", "MaskedModel", "find_subnetwork", "load_mask", "mask_density", "transplant", "Transplant",
           "TRANSFER_CONDITIONS", "ablate_subnetwork", "Ablations", "ABLATION_MODES"]


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


def ablate_subnetwork(model: nn.Module, mask: Mapping[str, torch.Tensor] | MaskedModel | str | Path,
                      data: Mapping[str, Iterable] | Iterable, *, modes: Sequence[str] = ABLATION_MODES,
                      draws: int = 5, seed: int = 0, unit: Optional[str] = None) -> Ablations:
    """Test a subnetwork causally: ``model``'s accuracy and loss on each data set under NeuroSurgeon's ablation modes.

    Modes (``instill.subnetworks.ablations``): ``full_model`` (the reference), ``subnetwork`` (only the subnetwork
    kept), ``zero_ablate`` (it removed), ``random_ablate`` (its weights replaced by fresh random values),
    ``randomly_sampled`` (as many random weights or units removed per layer) and ``complement_sampled`` (as many
    removed from outside the subnetwork); the last three ``draws`` times each, seeded by ``seed``. The model's weights
    are swapped in place for each evaluation and always restored.

    Args:
        model: the model the mask was found on; batches go to the device its parameters are on.
        mask: ``{parameter name: bool tensor}`` (True: in the subnetwork), a ``MaskedModel`` (its hard masks), or a
            mask directory (checked against ``model`` as ``load_mask`` does).
        data: ``{name: loader}`` (``{"subtask": ..., "base_task": ...}``) or one loader, named ``data``; each yields
            ``(inputs, targets)`` batches and can be iterated once per mode and draw (a ``DataLoader``, a list).
            Targets of -100 are not scored.
        modes: which modes, in this order.
        draws: random draws per drawn mode.
        seed: seeds the draws (the same seed gives the same results).
        unit: ``weight`` or ``neuron`` masks (default: the ``MaskedModel``'s or the directory's, else ``weight``).

    Returns:
        ``Ablations``: ``rows`` (one per mode and draw: ``<name>_acc``, ``<name>_loss`` per data set),
        ``summary()`` (mean, standard deviation, minimum, maximum and all values per mode and score) and
        ``plot(path)``.

    Raises:
        UserError: an unknown mode, a mask that does not fit ``model``, a data set with nothing to score, or a mode
            this mask cannot serve (see ``run_ablations``).
    """
    masks, recorded_unit = _masks_and_unit(model, mask)
    if unit is not None and recorded_unit is not None and unit != recorded_unit:
        raise UserError(f"ablate_subnetwork: unit {unit!r} differs from the mask's own ({recorded_unit!r})")
    loaders = dict(data) if isinstance(data, Mapping) else {"data": data}
    device = device_of(model)

    def score(ablated: nn.Module) -> dict[str, float]:
        scores = {}
        for name, loader in loaders.items():
            acc, loss, scored = score_batches(ablated, (input_target_pair(batch) for batch in loader), device)
            if scored == 0:
                raise UserError(f"ablate_subnetwork: data {name!r} gave no target to score (an empty loader, targets "
                                f"all -100, or a one-shot iterator: pass a DataLoader or a list)")
            scores[f"{name}_acc"], scores[f"{name}_loss"] = acc, loss
        return scores

    return run_ablations(model, masks, score, modes=modes, draws=draws, seed=seed,
                         unit=unit or recorded_unit or "weight")


def _masks_and_unit(model: nn.Module, mask) -> tuple[dict[str, torch.Tensor], Optional[str]]:
    """The bool masks a mask argument gives, and the unit it records (None for a plain mapping)."""
    if isinstance(mask, MaskedModel):
        return mask.hard_masks(), mask.config.unit
    if isinstance(mask, (str, Path)):
        hyperparameters = read_mask_meta(mask).get("hyperparameters") or {}
        return load_mask(mask, model), str(hyperparameters.get("unit", "weight"))
    if isinstance(mask, Mapping):
        return dict(mask), None
    raise UserError(f"ablate_subnetwork: mask must be a mapping of parameter names to bool tensors, a MaskedModel or "
                    f"a mask directory, got {type(mask).__name__}")
