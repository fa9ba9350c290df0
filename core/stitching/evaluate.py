"""The figures of a stitched network on one split: how its function agrees with the end model's (accuracy, relative
accuracy, agreement, cross-entropy and KL divergence to the end model, the right/wrong overlap), and how the stitched
activations compare with the end model's own (mean squared difference, R^2, similarity measures).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch

from ..compare.similarity import cka, get_similarity
from ..errors import UserError
from .pair import Stitch, Views
from .stitch import StitchTransform, agreement_metrics


@torch.no_grad()
def evaluate_stitch(stitch: Stitch, transform: Optional[StitchTransform], views: Views, has_labels: bool,
                    measures: list[str], max_samples: int) -> dict[str, float]:
    """The functional and representational figures of the stitched network (or, with ``transform`` None, the end
    model itself) on one split."""
    sums: dict[str, float] = {}
    kept_t, kept_b, n = [], [], 0
    sq_err = sq_tot = 0.0
    b_sum = b_sq = None
    for index, v in views.batches():
        t = v["b"] if transform is None else transform(v["a"])
        logits = v["end_logits"] if transform is None else stitch.tail(t, v.get("x"))
        y = views.split.y[index].to(logits.device) if has_labels else None
        for k, value in agreement_metrics(logits, v["end_logits"], y).items():
            sums[k] = sums.get(k, 0.0) + float(value)
        diff = (t - v["b"]).double()
        sq_err += float((diff ** 2).sum())
        flat_b = v["b"].double().flatten(1)
        b_sum = flat_b.sum(0) if b_sum is None else b_sum + flat_b.sum(0)
        b_sq = float((flat_b ** 2).sum()) + (b_sq or 0.0)
        n += len(index)
        if sum(len(k) for k in kept_t) < max_samples:
            kept_t.append(t.cpu())
            kept_b.append(v["b"].cpu())
    sq_tot = b_sq - float((b_sum ** 2).sum()) / n
    out = {"agreement": sums["agreement"] / n, "ce_to_end": sums["ce_to_end"] / n, "kl_to_end": sums["kl_to_end"] / n,
           "l2": sq_err / (n * math.prod(views.stitch.transform.end.shape)),
           "r2": 1 - sq_err / sq_tot if sq_tot > 0 else float("nan")}
    if has_labels:
        out.update(acc=sums["acc"] / n, end_acc=sums["end_acc"] / n,
                   rel_acc=sums["acc"] / sums["end_acc"] if sums["end_acc"] else float("nan"),
                   **{k: sums[k] / n for k in ("rr", "rw", "wr", "ww")})
    t_all, b_all = torch.cat(kept_t)[:max_samples], torch.cat(kept_b)[:max_samples]
    for name in measures:
        out[name] = _measure(name, t_all, b_all)
    return out


def _measure(name: str, x: torch.Tensor, y: torch.Tensor) -> float:
    measure = get_similarity(name)
    if len(x) < measure.min_samples:
        raise UserError(f"similarity {name} needs at least {measure.min_samples} evaluation samples, got {len(x)}")
    return float(measure(x, y))


@torch.no_grad()
def raw_cka(stitch: Stitch, views: Views, max_samples: int) -> float:
    """CKA of the two layers' own activations (front against end), before any stitching."""
    a, b = [], []
    for _, v in views.batches(limit=max_samples):
        a.append(v["a"].cpu())
        b.append(v["b"].cpu())
    return float(cka(torch.cat(a), torch.cat(b)))


@torch.no_grad()
def front_accuracy(views: Views) -> dict[str, float]:
    correct = agree = n = 0
    for index, v in views.batches():
        pred = v["front_logits"].argmax(-1)
        correct += int((pred == views.split.y[index].to(pred.device)).sum())
        agree += int((pred == v["end_logits"].argmax(-1)).sum())
        n += len(index)
    return {"acc": correct / n, "agreement": agree / n}


def evaluate_variants(stitch: Stitch, variants: dict[str, StitchTransform], views: dict[str, Views],
                      has_labels: bool, measures: list[str], max_samples: int) -> list[dict[str, Any]]:
    """One row per (split, variant): the two models alone (``front``, ``end``), and the stitched network with each
    transform of ``variants`` (``before``, ``after``, ``ps_inv``), measured as ``evaluate_stitch`` does."""
    rows = []
    for split, split_views in views.items():
        front = front_accuracy(split_views)
        end = evaluate_stitch(stitch, None, split_views, has_labels, [], 4)
        rows.append({"split": split, "variant": "front", "agreement": front["agreement"],
                     **({"acc": front["acc"], "rel_acc": front["acc"] / end["acc"] if end["acc"] else float("nan")}
                        if has_labels else {})})
        rows.append({"split": split, "variant": "end", **{k: end[k] for k in ("agreement", "acc", "rel_acc")
                                                           if k in end}})
        for name in ("before", "after", "ps_inv"):
            if name in variants:
                rows.append({"split": split, "variant": name,
                             **evaluate_stitch(stitch, variants[name], split_views, has_labels, measures,
                                               max_samples)})
    return rows
