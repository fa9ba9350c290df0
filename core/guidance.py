"""Guidance: layer maps between a target and a frozen guide, and the representational-alignment loss.

    loss = task_loss + alpha * reduce_over_pairs(weight * (1 - similarity(target layer, guide layer)))

Layer maps:
- ``repo``: the original code's uniform stretch, guide layer i -> target layer min(round(i * step), n_t - 1) with
  Python's banker's rounding, where a later guide layer mapped to the same target layer overwrites the earlier
  one. This reproduces the paper's numbers (ResNet-18 -> Wide FCN keeps 3 of 21 terms).
- ``uniform``: the same stretch, every mapped pair kept.
- explicit ``{target: name, guide: name, weight: w}`` pairs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence


@dataclass(frozen=True)
class LayerPair:
    target: str
    guide: str
    weight: float = 1.0


def stretch_map(targets: Sequence[str], guides: Sequence[str], mode: Literal["repo", "uniform"]) -> list[LayerPair]:
    """Pairs from the original's uniform mapping of guide layers onto target layers."""
    if not targets or not guides:
        return []
    step = (len(targets) - 1) / (len(guides) - 1) if len(guides) > 1 else 1.0
    pairs = [LayerPair(targets[min(round(i * step), len(targets) - 1)], guide) for i, guide in enumerate(guides)]
    if mode == "uniform":
        return pairs
    last_per_target: dict[str, LayerPair] = {}
    for pair in pairs:  # the original stored terms in a dict keyed by the target layer
        last_per_target[pair.target] = pair
    return list(last_per_target.values())
