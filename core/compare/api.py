"""The comparison system's part of the Python API: a similarity measure on two tensors, and a layer-by-layer
comparison of two models over a data loader."""

from __future__ import annotations

from typing import Any, Optional

import torch

from .measures import Comparison, compare_models
from .similarity import SIMILARITIES, get_similarity

__all__ = ["measure_similarity", "measures", "compare_models", "Comparison"]


def measure_similarity(x: torch.Tensor, y: torch.Tensor, measure: str = "cka",
                       options: Optional[dict[str, Any]] = None) -> torch.Tensor:
    """How similar two sets of activations of the same samples are.

    Args:
        x: (n, ...) activations of n samples (features are flattened).
        y: (n, ...) activations of the same n samples, from another layer or network.
        measure: one of ``measures()`` (``instill list measures``), or the import path ``pkg.module:function`` of a
            measure of your own.
        options: the measure's own options (a measure function of your own: its keyword-only parameters;
            ``instill list similarities`` shows them).

    Returns:
        A 0-dim tensor (1 for identical representations up to the measure's invariances); differentiable.

    Raises:
        UserError: an unknown measure or option, sample counts that differ, or too few samples for an estimate.
    """
    return get_similarity(measure, options)(x, y)


def measures() -> list[str]:
    """The names ``measure_similarity`` and ``alignment_loss`` accept.

    Returns:
        The measure names, sorted.
    """
    return SIMILARITIES.names()
