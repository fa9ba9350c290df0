"""One stitch of a pair of layers: the frozen pieces of both models and the transform between them
(``build_stitch``, for the stage and ``stitch_models`` alike), and what the frozen models give on a split
(``Views``: computed once and cached, or per batch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch import Tensor, nn

from ..data import Split, batches
from ..errors import UserError, under_key
from ..models import check_finite_output
from .stitch import Head, Side, StitchTransform, Tail, layout_of


@dataclass
class Stitch:
    """One pair's frozen pieces and its transform; ``names``: the two models, as messages name them."""

    front_layer: str
    end_layer: str
    head: Head
    end_head: Head
    tail: Tail
    transform: StitchTransform
    names: tuple[str, str] = ("front model", "end model")


def build_stitch(front: nn.Module, end: nn.Module, front_layer: str, end_layer: str, sample: Tensor, *,
                 kind: str = "affine", rank: Optional[int] = None, bias: bool = True, resize: str = "bilinear",
                 layouts: tuple[str, str] = ("auto", "auto"), names: tuple[str, str] = ("front model", "end model")
                 ) -> Stitch:
    """Split ``front`` after ``front_layer`` and ``end`` at ``end_layer``, and build the transform between the two
    activations (on ``sample``'s device), each piece run once on ``sample`` (a few inputs).

    Args:
        kind, rank, bias, resize: the ``StitchTransform``'s.
        layouts: the front and end activation's layout (``auto``: from its number of axes).
        names: the two models, as messages name them.
    Raises:
        UserError: a layer that is not in its model; an activation that is not finite or has no batch axis;
            two activations that no transform of this kind connects; an end model's tail that does not take it.
    """
    head, end_head, tail = Head(front, front_layer), Head(end, end_layer), Tail(end, end_layer)
    with torch.no_grad():
        a, b = head(sample), end_head(sample)
    check_finite_output(a, front_layer, names[0])
    check_finite_output(b, end_layer, names[1])
    for what, act in (("front", a), ("end", b)):
        if act.shape[0] != len(sample):
            raise UserError(f"{what} layer gives shape {tuple(act.shape)}, whose first axis is not the batch")
    sides = [Side(tuple(t.shape[1:]), layout_of(tuple(t.shape[1:]), declared)) for t, declared in zip((a, b), layouts)]
    with under_key(f"{front_layer} -> {end_layer}"):
        transform = StitchTransform(*sides, kind=kind, rank=rank, bias=bias, resize=resize).to(sample.device)
    with torch.no_grad():
        out = tail(transform(a), sample)
    if out.shape[0] != len(sample):
        raise UserError(f"the end model's tail after {end_layer} gives shape {tuple(out.shape)}")
    return Stitch(front_layer, end_layer, head, end_head, tail, transform, names)


class Views:
    """What the frozen models give for samples of a split, computed once (``cached``) or per batch.

    Keys: ``a`` (front activation), ``b`` (end activation), ``front_logits``, ``end_logits``, ``x`` (the input,
    for a hook-fallback tail); ``needs`` names those besides ``a`` to compute; ``front`` and ``end`` are the two
    whole models (their logits).
    """

    def __init__(self, stitch: Stitch, front: nn.Module, end: nn.Module, split: Split, needs: set[str],
                 cached: bool, batch_size: int, device: torch.device):
        self.stitch, self.front, self.end, self.split = stitch, front, end, split
        self.needs, self.batch_size, self.device = needs, batch_size, device
        self.cache: Optional[dict[str, Tensor]] = None
        if cached:
            chunks = [self._compute(x) for x, _ in batches(split, batch_size)]  # a stream decodes each item once
            self.cache = {k: torch.cat([c[k] for c in chunks]) for k in chunks[0]}

    @torch.no_grad()
    def _compute(self, x: Tensor) -> dict[str, Tensor]:
        x = x.to(self.device)
        out = {"a": self.stitch.head(x)}
        if "b" in self.needs:
            out["b"] = self.stitch.end_head(x)
        if "front_logits" in self.needs:
            out["front_logits"] = self.front(x)
        if "end_logits" in self.needs:
            out["end_logits"] = self.end(x)
        if "x" in self.needs:
            out["x"] = x
        check_finite_output(out["a"], self.stitch.front_layer, self.stitch.names[0])
        if "b" in out:
            check_finite_output(out["b"], self.stitch.end_layer, self.stitch.names[1])
        return out

    def get(self, index: Tensor) -> dict[str, Tensor]:
        if self.cache is None:
            return self._compute(self.split.inputs(index))
        return {k: v[index.to(v.device)] for k, v in self.cache.items()}

    def batches(self, limit: Optional[int] = None) -> Iterator[tuple[Tensor, dict[str, Tensor]]]:
        n = len(self.split) if limit is None else min(limit, len(self.split))
        for i in range(0, n, self.batch_size):
            index = torch.arange(i, min(i + self.batch_size, n))
            yield index, self.get(index)
