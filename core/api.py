"""instill's Python API: its systems on your own ``nn.Module`` and ``DataLoader``, without a config or a run directory.

Everything here is also importable from the top level (``import instill; instill.measure_similarity(x, y)``); the
package imports it lazily, so ``import instill`` costs nothing until a name is used. These names are the stable surface;
the modules behind them (``instill.masks``, ``instill.guidance``, ...) hold the details and may change.

Masks (subnetwork discovery and transfer, ``instill.masks`` and ``instill.transfer``)::

    masked = instill.find_subnetwork(model, loader, layers=["Linear"], epochs=5)   # a trained MaskedModel
    masked.save("my_mask")                                   # mask.safetensors + mask.json
    mask = instill.load_mask("my_mask", model)               # {parameter name: bool tensor}, checked
    start = instill.transplant("subnet", model, fresh, mask)  # train start.model, call start.after_step()

Similarity (``instill.similarity``)::

    instill.measure_similarity(x, y, "cka")                  # a 0-dim tensor; differentiable in x and y

Guidance (``instill.guidance``), an alignment loss for your own training loop::

    align = instill.alignment_loss(model, guide, [("layers.0", "conv1"), ("layers.1", "layer1")])
    for x, y in loader:
        loss = F.cross_entropy(model(x), y) + align(x)[0]    # the model's forward first, then the loss

How the pieces fit and why they are built as they are: ``docs/design.md``.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Literal, Optional, Sequence

import torch
from torch import nn

from .errors import UserError
from .features import DEFAULT_TYPES, FeatureCapture, probe
from .guidance import AlignmentLoss, LayerPair, resolve_pairs
from .masks import MaskConfig, MaskedModel, load_mask, mask_density
from .similarity import SIMILARITIES, get_similarity
from .transfer import CONDITIONS as TRANSFER_CONDITIONS
from .transfer import Transplant, transplant
from .train import logits_of

__all__ = [
    # masks: find a subnetwork, save and load it, transplant it
    "MaskConfig", "MaskedModel", "find_subnetwork", "load_mask", "mask_density", "transplant", "Transplant",
    "TRANSFER_CONDITIONS",
    # similarity: a measure on two tensors
    "measure_similarity", "measures",
    # guidance: an alignment loss for your own training loop
    "alignment_loss", "AlignmentLoss", "LayerPair", "FeatureCapture", "probe",
    # comparison (a layer-by-layer matrix over a data loader): added with the compare system
    # stitching: added with the stitch system
    # Align learning rules: added with the align system
    "UserError",
]


# ----------------------------------------------------------------------------------------------------- masks

def _device_of(model: nn.Module) -> torch.device:
    param = next(iter(model.parameters()), None)
    return param.device if param is not None else torch.device("cpu")


def _pair(batch: Any) -> tuple[Any, Any]:
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise UserError(f"the data loader must yield (inputs, targets) batches, got {type(batch).__name__}")


def _cross_entropy(output: Any, target: torch.Tensor) -> torch.Tensor:
    logits = logits_of(output)
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1),
                                       ignore_index=-100)


def find_subnetwork(model: nn.Module, loader: Iterable, *, layers: Sequence[str] = ("Linear",),
                    method: Literal["continuous_sparsification", "hard_concrete", "magnitude"] =
                    "continuous_sparsification", epochs: int = 5, lr: float = 0.01, l0_lambda: float = 1e-6,
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
        method: ``continuous_sparsification``, ``hard_concrete`` or ``magnitude``.
        epochs: passes over ``loader``.
        lr: AdamW learning rate of the mask logits.
        l0_lambda: weight of the L0 (density) penalty: larger gives sparser masks.
        loss_fn: ``loss_fn(output, targets)``; default cross-entropy on the output's logits (-100 targets ignored).
        **mask_options: further ``MaskConfig`` fields (``unit``, ``mask_bias``, ``final_temp``, ``prune_fraction``,
            ...).

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
    device = _device_of(model)
    masked = MaskedModel(model, config).to(device)
    if masked.method.trainable:
        optimizer = torch.optim.AdamW(masked.logits.parameters(), lr=lr)
        for epoch in range(epochs):
            masked.set_epoch(epoch, epochs)
            masked.train()
            for batch in loader:
                x, y = _pair(batch)
                loss = loss_fn(masked(x.to(device)), y.to(device)) + masked.penalty()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    return masked.eval()


# ----------------------------------------------------------------------------------------------------- similarity

def measure_similarity(x: torch.Tensor, y: torch.Tensor, measure: str = "cka") -> torch.Tensor:
    """How similar two sets of activations of the same samples are.

    Args:
        x: (n, ...) activations of n samples (features are flattened).
        y: (n, ...) activations of the same n samples, from another layer or network.
        measure: one of ``measures()``: ``cka``, ``cka_unbiased``, ``rsa``, ``rsa_classic``, ``procrustes``,
            ``cca``, ``cca_squared``, ``svcca``, ``pwcca``.

    Returns:
        A 0-dim tensor (1 for identical representations up to the measure's invariances); differentiable.

    Raises:
        UserError: an unknown measure, sample counts that differ, or too few samples for an estimate.
    """
    return get_similarity(measure)(x, y)


def measures() -> list[str]:
    """The names ``measure_similarity`` and ``alignment_loss`` accept.

    Returns:
        The measure names, sorted.
    """
    return sorted(SIMILARITIES)


# ----------------------------------------------------------------------------------------------------- guidance

PairSpec = Sequence[str | float]


def alignment_loss(target: nn.Module, guide: nn.Module,
                   pairs: Sequence[PairSpec] | Literal["uniform", "repo"], *, sample: Optional[torch.Tensor] = None,
                   target_layers: Sequence[Any] = DEFAULT_TYPES, guide_layers: Sequence[Any] = DEFAULT_TYPES,
                   similarity: str = "cka", alpha: float = 1.0, reduce: Literal["sum", "mean"] = "sum",
                   tokenwise: Optional[Literal["positions", "rows"]] = None, steps: Optional[int] = None
                   ) -> AlignmentLoss:
    """A representational-alignment loss that pulls ``target``'s layers towards a frozen ``guide``'s.

    ``loss = alpha * reduce over pairs of weight * (1 - similarity(target layer, guide layer))``. Hooks record the
    paired target layers during the target's own forward, so call the target first and the loss right after::

        output = target(x)
        align_loss, sims = align(x)        # the guide runs on x under no_grad; sims: each pair's similarity

    An evaluation forward in between is harmless (each forward starts a fresh capture); a loss whose last target
    forward ran under ``no_grad`` raises instead of silently training nothing. Wrap evaluations in
    ``align.paused()`` to skip the hooks' copies; call ``align.close()`` when training ends.

    Args:
        target: the network being trained.
        guide: the guide network; it is put in evaluation mode and frozen.
        pairs: ``[(target layer, guide layer)]`` or ``[(target layer, guide layer, weight)]`` by module name
            (``name@k`` for the (k+1)-th call of a shared module), or ``"uniform"`` / ``"repo"``: the original
            code's stretch of the guide's layers over the target's (``repo`` keeps its overwriting), over the layers
            ``target_layers`` / ``guide_layers`` select, the last (logits) layer of each left out.
        sample: a batch of inputs; needed for ``"uniform"`` / ``"repo"`` (one probe forward lists the layers).
        target_layers: module names or types for the stretch maps (default: linear, conv, pooling, recurrent,
            attention, norm and transformer layers).
        guide_layers: the same for the guide.
        similarity: one of ``measures()``.
        alpha: the loss weight.
        reduce: ``sum`` or ``mean`` over pairs.
        tokenwise: for (batch, time, ...) sequence captures: ``positions`` (sum over positions) or ``rows``.
        steps: guidance only for the first N optimizer steps (see ``AlignmentLoss.active``).

    Returns:
        The ``AlignmentLoss``; calling it with the guide's input gives ``(loss, {pair: similarity})``.

    Raises:
        UserError: a layer name that is not in the model (with the nearest names), an unknown measure, a stretch
            map without ``sample`` or that pairs no layers.
    """
    if isinstance(pairs, str):
        if sample is None:
            raise UserError(f"alignment_loss: pairs={pairs!r} needs sample=<a batch of inputs> to list the layers")
        target_keys = list(probe(target, list(target_layers), sample))[:-1]
        guide_keys = list(probe(guide, list(guide_layers), sample))[:-1]
        resolved = resolve_pairs(pairs, target_keys, guide_keys)
    else:
        resolved = []
        for pair in pairs:
            if isinstance(pair, LayerPair):
                resolved.append(pair)
            elif isinstance(pair, (tuple, list)) and len(pair) in (2, 3):
                resolved.append(LayerPair(str(pair[0]), str(pair[1]), float(pair[2]) if len(pair) == 3 else 1.0))
            else:
                raise UserError(f"alignment_loss: a pair is (target layer, guide layer[, weight]), got {pair!r}")
    if not resolved:
        raise UserError("alignment_loss: no layer pairs (does each side capture at least two layers?)")
    return AlignmentLoss(target, guide, resolved, similarity=similarity, alpha=alpha, reduce=reduce,
                         tokenwise=tokenwise, steps=steps)
