"""The guidance system's part of the Python API: an alignment loss for your own training loop."""

from __future__ import annotations

from typing import Any, Literal, Optional, Sequence

import torch
from torch import nn

from ..compare.capture import DEFAULT_TYPES, FeatureCapture, probe
from ..errors import UserError
from .loss import AlignmentLoss, LayerPair, resolve_pairs

__all__ = ["alignment_loss", "AlignmentLoss", "LayerPair", "FeatureCapture", "probe"]

PairSpec = Sequence[str | float]


def alignment_loss(target: nn.Module, guide: nn.Module,
                   pairs: Sequence[PairSpec] | Literal["uniform", "repo"], *, sample: Optional[torch.Tensor] = None,
                   target_layers: Sequence[Any] = DEFAULT_TYPES, guide_layers: Sequence[Any] = DEFAULT_TYPES,
                   similarity: str = "cka", similarity_options: Optional[dict[str, Any]] = None, alpha: float = 1.0,
                   reduce: Literal["sum", "mean"] = "sum", tokenwise: Optional[Literal["positions", "rows"]] = None,
                   steps: Optional[int] = None) -> AlignmentLoss:
    """A representational-alignment loss that pulls ``target``'s layers towards a frozen ``guide``'s.

    ``loss = alpha * reduce over pairs of weight * (1 - similarity(target layer, guide layer))``. Hooks record the
    paired target layers during the target's own forward, so call the target first and the loss right after::

        output = target(x)
        align_loss, sims = align(x)        # the guide runs on x under no_grad; sims: each pair's similarity

    or run the guide first, which gives the same loss with less memory held at once (its temporaries are freed
    before the target's autograd graph is built)::

        align.run_guide(x)
        output = target(x)
        align_loss, sims = align()

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
        similarity: one of ``measures()``, or the import path of a measure function of your own.
        similarity_options: that measure's own options (its keyword-only parameters).
        alpha: the loss weight.
        reduce: ``sum`` or ``mean`` over pairs.
        tokenwise: for (batch, time, ...) sequence captures: ``positions`` (sum over positions) or ``rows``.
        steps: guidance only for the first N optimizer steps (see ``AlignmentLoss.active``).

    Returns:
        The ``AlignmentLoss``; calling it with the guide's input gives ``(loss, {pair: similarity})``.

    Raises:
        UserError: a layer name that is not in the model (with the nearest names), an unknown measure or option, a
            stretch map without ``sample`` or that pairs no layers.
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
    return AlignmentLoss(target, guide, resolved, similarity=similarity, similarity_options=similarity_options,
                         alpha=alpha, reduce=reduce, tokenwise=tokenwise, steps=steps)
