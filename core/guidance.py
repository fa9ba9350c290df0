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

import difflib
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Sequence

import torch
from torch import nn

from core.errors import UserError


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


def resolve_pairs(spec: str | Sequence[Mapping[str, Any]], target_keys: Sequence[str], guide_keys: Sequence[str]
                  ) -> list[LayerPair]:
    """The layer pairs a config asks for: ``repo`` / ``uniform`` over the captured keys, or explicit pairs."""
    if isinstance(spec, str):
        return stretch_map(target_keys, guide_keys, spec)
    pairs = [LayerPair(p["target"], p["guide"], float(p.get("weight", 1.0))) for p in spec]
    for side, keys, attr in (("target", target_keys, "target"), ("guide", guide_keys, "guide")):
        for pair in pairs:
            if getattr(pair, attr) not in keys:
                near = difflib.get_close_matches(getattr(pair, attr), keys, n=3)
                raise UserError(f"guidance.layer_map: {side} layer {getattr(pair, attr)!r} is not captured"
                                + (f"; nearest: {', '.join(near)}" if near else f"; captured: {', '.join(keys[:6])}"))
    return pairs


def module_of(key: str) -> str:
    """The module name of a capture key (``layers.0@2`` is the third call of ``layers.0``)."""
    return key.split("@", 1)[0]


class AlignmentLoss:
    """alpha * reduce over pairs of weight * (1 - similarity(target capture, guide summary)).

    The guide runs under ``no_grad`` in evaluation mode; each of its hooked layers keeps only its summary (an n x n
    Gram matrix for CKA), computed inside the hook. The target's captures come from the same forward that gives
    its logits. ``tokenwise`` compares (batch, time, ...) captures token by token: every (sample, token) is a row.
    """

    def __init__(self, target: nn.Module, guide: nn.Module, pairs: list[LayerPair], *, similarity: str = "cka",
                 alpha: float = 1.0, reduce: str = "sum", tokenwise: bool = False):
        from core.features import FeatureCapture
        from core.similarity import get_similarity

        self.pairs, self.alpha, self.reduce, self.tokenwise = pairs, alpha, reduce, tokenwise
        self.measure = get_similarity(similarity)
        self.guide = guide.eval().requires_grad_(False)
        self.target_capture = FeatureCapture(target, sorted({module_of(p.target) for p in pairs})).open()
        self.guide_capture = FeatureCapture(guide, sorted({module_of(p.guide) for p in pairs}),
                                            transform=lambda t: self.measure.summarize(self._rows(t))).open()

    def _rows(self, capture: torch.Tensor) -> torch.Tensor:
        return capture.reshape(-1, *capture.shape[2:]) if self.tokenwise and capture.dim() > 2 else capture

    def guide_summaries(self, guide_input: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            self.guide(guide_input)
        return self.guide_capture.pop()

    def __call__(self, guide_input: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """The alignment term for the target forward that just ran, and each pair's similarity for the log."""
        targets = self.target_capture.pop()
        guides = self.guide_summaries(guide_input)
        terms, logs = [], {}
        for pair in self.pairs:
            sim = self.measure.with_summary(self._rows(targets[pair.target]), guides[pair.guide])
            terms.append(pair.weight * (1 - sim))
            logs[f"sim/{pair.target}~{pair.guide}"] = sim.item()
        total = torch.stack(terms).sum() if self.reduce == "sum" else torch.stack(terms).mean()
        return self.alpha * total, logs

    def discard(self) -> None:
        """Drop captures of a target forward whose alignment is not wanted (evaluation, unguided steps)."""
        self.target_capture.pop()

    def close(self) -> None:
        self.target_capture.close()
        self.guide_capture.close()
