"""Guidance: layer maps (the original's overwriting stretch, every pair kept) and the alignment loss."""

from __future__ import annotations

from core.guidance import LayerPair, stretch_map


def names(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i}" for i in range(n)]


def test_repo_map_reproduces_the_originals_surviving_terms():
    # ResNet-18 (20 convs + avgpool) -> Wide FCN (3 linears): only 3 of 21 terms survive the dict overwrite.
    pairs = stretch_map(names("lin", 3), names("g", 21), "repo")
    assert [(p.target, p.guide) for p in pairs] == [("lin0", "g5"), ("lin1", "g14"), ("lin2", "g20")]
    # Transformer (32 captured layers) -> 4-layer RNN on copy-paste: 4 terms, guides 5, 15, 25, 31.
    pairs = stretch_map(names("rnn", 4), names("g", 32), "repo")
    assert [p.guide for p in pairs] == ["g5", "g15", "g25", "g31"]


def test_uniform_map_keeps_every_pair():
    pairs = stretch_map(names("lin", 3), names("g", 21), "uniform")
    assert len(pairs) == 21 and pairs[0] == LayerPair("lin0", "g0") and pairs[-1] == LayerPair("lin2", "g20")
    assert stretch_map(names("t", 5), ["only"], "uniform") == [LayerPair("t0", "only")]
    assert stretch_map([], ["g"], "repo") == []
