"""Layer-by-layer similarity of two networks, streamed over a dataset: every selected pair of layers at once.

    from instill.compare import compare_models

    result = compare_models(model_a, model_b, loader, layers_a=["bn*"], layers_b=["bn*"],
                            measures=["cka_minibatch", "cka", "procrustes"])
    result.matrix("cka_minibatch")        # numpy array, layers_a x layers_b
    result.heatmap("cka_minibatch")       # a matplotlib figure with layer names on both axes
    result.rows                           # tidy: [{layer_a, layer_b, measure, value, n}, ...]

``loader`` is any iterable of batches (a ``torch.utils.data.DataLoader``, a list of tensors, ``BatchLoader``); a
batch is an input tensor or a tuple whose first element is the input. Each batch makes one forward pass of each
model (no gradients, evaluation mode; the models' modes are restored afterwards); forward hooks
(``instill.compare.capture``) capture the selected layers, and every measure's statistics are updated for all pairs.

Measures. Streaming measures keep statistics whose size does not depend on the number of samples:

- ``cka_minibatch`` (the default): minibatch linear CKA of Nguyen, Raghu & Kornblith (2021). Per batch, the unbiased
  HSIC (Song et al. 2012) of every pair, from each layer's U-centred Gram matrix computed once (the product in
  float32 at full precision, centring and sums in float64), summed over batches;
  CKA = sum HSIC(a, b) / sqrt(sum HSIC(a, a) sum HSIC(b, b)). It does not drift with the batch size the way
  averaging per-batch CKA values does. Batches of fewer than 4 samples are skipped (HSIC_u needs 4).
- ``channel_corr``: Pearson correlation of every channel pair, pixels as samples (N*H*W for conv maps; the
  original's ``corr``), from float64 running sums; reported as the mean over ``b``'s channels of the best
  correlation with any channel of ``a`` (the semi-match score: 1 when ``b``'s channels are copies of ``a``'s).
  Pairs whose spatial sizes differ have no pixel correspondence and are left out.
- ``l2``: mean squared difference of all entries (the original's ``l2``), a distance: 0 for identical layers.
  Only pairs of identical shape.

Each streaming measure is a ``Measure`` with ``start`` (a ``Stream``: built from the first batch, updated every
batch, ``value(i, j)`` at the end) and optionally ``summarize`` (what a layer's hook keeps of a batch); one of your
own is registered in ``MEASURES`` and runs the same way. ``sketch_features=k`` is minibatch CKA's approximate mode
(``Sketch``): wide layers randomly projected first, seeded, below the exact cost, with an error that
``bench/compare.py --sketch`` measures.

Full-data measures need every sample at once (n x n or n x d matrices): they use the first ``full_samples``
samples streamed (the loader's order; shuffled loaders give a random subset), capped explicitly, and say so in
``n``. They are the measures of ``instill.compare.similarity`` (``SIMILARITIES``, your own registered ones
included): ``cka`` (linear CKA with the biased HSIC over all
samples,
Kornblith et al. 2019), ``cka_unbiased``, ``rsa``, ``rsa_classic``, ``procrustes``, ``cca`` (mean canonical
correlation), ``cca_r2`` (mean squared canonical correlation, Yanai's R^2_CCA, centred), ``svcca``, ``pwcca``;
plus ``lr_r2``: the centred linear-regression R^2, the fraction of ``b``'s variance that a linear map of ``a``
explains (not symmetric). The CCA family and ``lr_r2`` are degenerate (trivially 1) unless there are more samples
than features, so they need ``n > d + 1`` for every layer they regress on (``spatial="mean"`` pools conv maps to
their channels first).

A model compared with itself gives 1 on the diagonal for every similarity and 0 for ``l2``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, Callable, Iterable, Literal, Optional, Protocol, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import UserError, unknown_name
from ..registry import Registry
from ..seeds import derive_seed
from .capture import FeatureCapture, LayerSpec
from .similarity import SIMILARITIES, Similarity, full_precision, get_similarity, symmetric_product
from ..files import csv_text

Spatial = Literal["flatten", "mean"]
UNBIASED_MIN_BATCH = 4


@dataclass(frozen=True)
class Measure:
    """A measure ``compare_models`` can accumulate: streaming (``start``) or on the first ``full_samples`` samples.

    Streaming: ``summarize`` is what a layer's forward hook keeps of each batch (default: its float32 features, as
    ``spatial`` gives them; ``cka_minibatch`` keeps the n x n Gram matrix and drops the activation at once), and
    ``start(summaries_a, summaries_b)`` builds the ``Stream`` from the first batch. Full data: each layer's
    features are ``prepare``d once, then ``prepared_pair`` gives every pair's value (default: the features centred
    and rotated onto their row space, then ``pair``). A measure of your own is registered in ``MEASURES``.
    """

    name: str
    description: str
    start: Optional[Callable[[list[Tensor], list[Tensor]], Stream]] = None
    summarize: Optional[Callable[[Tensor], Tensor]] = None
    distance: bool = False  # 0 = identical (l2); otherwise 1 = most similar
    needs_more_samples_than_features: Literal["none", "both", "a"] = "none"
    pair: Optional[Callable[[Tensor, Tensor], Tensor]] = None  # a full-data measure's value for one pair of layers
    prepare: Optional[Callable[[Tensor], Any]] = None
    prepared_pair: Optional[Callable[[Any, Any], Tensor]] = None
    # The approximate mode: ``summarize`` under a ``Sketch`` (None: the measure has none).
    sketch_summarize: Optional[Callable[[Tensor, "Sketch"], Tensor]] = None

    @property
    def streaming(self) -> bool:
        return self.start is not None

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        if self.pair is None:
            raise UserError(f"measure {self.name} is a streaming measure: compare_models computes it over batches")
        return self.pair(x, y)

    def matrix(self, feats_a: list[Tensor], feats_b: list[Tensor]) -> np.ndarray:
        """A full-data measure for every pair: each layer prepared once (an n x n matrix, a QR), then the pairs."""
        prepare = self.prepare or _reduced
        pair = self.prepared_pair or self.pair
        prepared_a, prepared_b = [prepare(x) for x in feats_a], [prepare(y) for y in feats_b]
        return np.array([[pair(x, y).item() for y in prepared_b] for x in prepared_a]).reshape(len(feats_a),
                                                                                          len(feats_b))

    @classmethod
    def of(cls, similarity: Similarity) -> "Measure":
        """A similarity measure as a full-data compare measure."""
        return cls(similarity.name, similarity.description,
                   needs_more_samples_than_features=similarity.needs_more_samples_than_features, pair=similarity.pair,
                   prepare=similarity.prepare, prepared_pair=similarity.prepared_pair)


def measure_names() -> list[str]:
    """Every name ``compare_models`` accepts: its own measures and the similarity measures."""
    return sorted(MEASURES.names() + SIMILARITIES.names())


def get_measure(name: str, options: Optional[dict[str, Any]] = None) -> Measure:
    """The compare measure called ``name``, or the similarity measure of that name computed on full data with its
    ``options`` (a measure function of your own: its keyword-only parameters); a UserError naming the nearest known
    names, or the valid options, otherwise."""
    if name in MEASURES and isinstance(MEASURES.get(name).build, Measure):
        if options:
            raise UserError(f"measure {name} takes no options (they are for similarity measures of your own)")
        return MEASURES.get(name).build
    if name in SIMILARITIES or ":" in name:  # an import path: a similarity function (its import error, if any)
        return Measure.of(get_similarity(name, options))
    raise unknown_name("measure", name, measure_names() + list(SIMILARITIES.aliases))


def chosen_measures(measures: Sequence[str], options: dict[str, dict[str, Any]]) -> dict[str, Measure]:
    """Each listed measure with its options; a UserError for an unknown measure or option, or options of a measure
    the list does not name."""
    if stray := sorted(set(options) - set(measures)):
        raise UserError(f"measure_options names {', '.join(stray)}, which measures does not list")
    return {name: get_measure(name, options.get(name)) for name in measures}


# ----------------------------------------------------------------------------------------------------- result

@dataclass
class Comparison:
    """The tidy result of ``compare_models``: one row per (layer_a, layer_b, measure) with its value and ``n``."""

    layers_a: list[str]
    layers_b: list[str]
    measures: list[str]
    rows: list[dict[str, Any]] = field(default_factory=list)
    skipped: dict[str, list[str]] = field(default_factory=dict)  # measure -> "a~b: why" for pairs left out
    labels: tuple[str, str] = ("model A", "model B")

    def matrix(self, measure: str) -> np.ndarray:
        """``len(layers_a) x len(layers_b)`` values of ``measure`` (NaN where a pair was left out)."""
        values = np.full((len(self.layers_a), len(self.layers_b)), np.nan)
        index_a = {name: i for i, name in enumerate(self.layers_a)}
        index_b = {name: j for j, name in enumerate(self.layers_b)}
        for row in self.rows:
            if row["measure"] == measure:
                values[index_a[row["layer_a"]], index_b[row["layer_b"]]] = row["value"]
        return values

    def value(self, measure: str, layer_a: str, layer_b: str) -> float:
        """One value; a KeyError if the pair was not compared with ``measure``."""
        for row in self.rows:
            if (row["measure"], row["layer_a"], row["layer_b"]) == (measure, layer_a, layer_b):
                return row["value"]
        raise KeyError(f"{measure} of {layer_a} ~ {layer_b} was not computed")

    def to_csv(self) -> str:
        """The rows as CSV text: layer_a, layer_b, measure, value, n."""
        return csv_text(self.rows, ["layer_a", "layer_b", "measure", "value", "n"])

    def heatmap(self, measure: str, path: Optional[str] = None, *, annotate: Optional[bool] = None):
        """A heatmap of ``measure`` with layer names on both axes; saved to ``path`` when given. Returns the figure."""
        from ..plots import plot_heatmap

        return plot_heatmap(self.matrix(measure), self.layers_a, self.layers_b, path=path,
                            title=f"{measure} ({get_measure(measure).description})", xlabel=self.labels[1],
                            ylabel=self.labels[0], annotate=annotate,
                            limits=None if get_measure(measure).distance else (0.0, 1.0))


# ----------------------------------------------------------------------------------------------------- streaming

class Stream(Protocol):
    """A streaming measure's statistics for every pair it compares, of fixed size whatever the number of samples.

    A measure's ``start(feats_a, feats_b)`` builds one from the first batch (each layer's ``summarize``d
    features, in layer order); ``update`` adds every batch, the first included; ``value(i, j)`` is the measure of
    layer ``i`` of model A and layer ``j`` of model B at the end (a UserError where it is undefined).
    """

    pairs: list[tuple[int, int]]  # the (i, j) it compares; compare_models lists the others as skipped
    n: int  # samples counted

    def update(self, feats_a: list[Tensor], feats_b: list[Tensor]) -> None: ...

    def value(self, i: int, j: int) -> float: ...


def _features(tensor: Tensor, spatial: Spatial) -> Tensor:
    """A capture as the measures see it: (n, ...) in float32, conv maps pooled to channels with ``mean``."""
    tensor = tensor.float()
    if spatial == "mean" and tensor.dim() > 2:
        tensor = tensor.flatten(2).mean(2)
    return tensor


def linear_gram(x: Tensor) -> Tensor:
    """``X X^T`` (n x n) of the flattened samples, float32 at full precision."""
    with full_precision(x.device.type):
        return symmetric_product(x.reshape(x.shape[0], -1).float())


def _u_centred(grams: Sequence[Tensor]) -> Tensor:
    """U-centring (Szekely and Rizzo 2014) in float64 of L raw Gram matrices: a (L, n, n) stack."""
    k = torch.stack(list(grams)).double()
    n = k.shape[-1]
    k.diagonal(dim1=-2, dim2=-1).zero_()
    rows = k.sum(-1, keepdim=True)
    total = rows.sum(-2, keepdim=True)
    k -= rows / (n - 2)
    k -= rows.mT / (n - 2)
    k += total / ((n - 1) * (n - 2))
    k.diagonal(dim1=-2, dim2=-1).zero_()
    return k


class _MinibatchCKA:
    """Sums of unbiased HSIC over batches for every pair, from each layer's raw Gram matrix (its ``summarize``):
    U-centred once per layer per batch, one matmul for all pairs."""

    def __init__(self, grams_a: list[Tensor], grams_b: list[Tensor]):
        device = grams_a[0].device
        self.pairs = [(i, j) for i in range(len(grams_a)) for j in range(len(grams_b))]
        self.ab = torch.zeros(len(grams_a), len(grams_b), dtype=torch.float64, device=device)
        self.aa = torch.zeros(len(grams_a), dtype=torch.float64, device=device)
        self.bb = torch.zeros(len(grams_b), dtype=torch.float64, device=device)
        self.n = 0
        self.sketched = False  # the approximate mode's (2, n, n) halves were seen
        self._values: Optional[Tensor] = None

    def update(self, grams_a: list[Tensor], grams_b: list[Tensor]) -> None:
        """Add one batch: each layer's (n, n) Gram matrix, or the approximate mode's (2, n, n) independent halves
        (``Sketch``), whose cross products are the unbiased HSIC estimates."""
        n = grams_a[0].shape[-1]
        if n < UNBIASED_MIN_BATCH:
            return
        ka, kb = _u_centred(grams_a).flatten(-2), _u_centred(grams_b).flatten(-2)
        scale = 1.0 / (n * (n - 3))
        if ka.dim() == 2:
            self.ab += (ka @ kb.mT) * scale
            self.aa += (ka * ka).sum(1) * scale
            self.bb += (kb * kb).sum(1) * scale
        else:
            self.sketched = True
            self.ab += (ka[:, 0] @ kb[:, 1].mT + ka[:, 1] @ kb[:, 0].mT) * (scale / 2)
            self.aa += (ka[:, 0] * ka[:, 1]).sum(1) * scale
            self.bb += (kb[:, 0] * kb[:, 1]).sum(1) * scale
        self.n += n

    def value(self, i: int, j: int) -> float:
        if self.n == 0:
            raise UserError(f"cka_minibatch needs batches of at least {UNBIASED_MIN_BATCH} samples; none was")
        if self._values is None:  # one transfer for all pairs
            self._values = (self.ab / torch.outer(self.aa, self.bb).sqrt()).cpu()
            self._self_hsic = (self.aa.cpu(), self.bb.cpu())
        for side, k in zip("ab", (i, j)):
            if not self._self_hsic["ab".index(side)][k] > 0:
                hsic = self._self_hsic["ab".index(side)][k].item()
                if self.sketched:
                    raise UserError(f"the sketch estimates the HSIC of model {side.upper()}'s layer with itself at "
                                    f"{hsic:.3g}: too few sketch_features for its spread (raise sketch_features, or "
                                    "compare exactly)")
                raise UserError(f"model {side.upper()}'s layer does not vary over the data (its HSIC with itself "
                                f"is {hsic:.3g}): CKA is undefined")
        return self._values[i, j].item()


def _pixels(x: Tensor) -> Tensor:
    """(n, C, ...) -> (n * pixels, C): channels as variables, every position of every sample as an observation."""
    return x.movedim(1, -1).reshape(-1, x.shape[1]).double() if x.dim() > 2 else x.reshape(x.shape[0], -1).double()


def _matching_pairs(feats_a: list[Tensor], feats_b: list[Tensor], spatial_only: bool) -> list[tuple[int, int]]:
    """Pairs of identical per-sample shape, or (``spatial_only``) identical positions (channels may differ)."""
    def match(a: Tensor, b: Tensor) -> bool:
        if spatial_only:
            return a.dim() == b.dim() and tuple(a.shape[2:]) == tuple(b.shape[2:])
        return tuple(a.shape[1:]) == tuple(b.shape[1:])

    return [(i, j) for i, a in enumerate(feats_a) for j, b in enumerate(feats_b) if match(a, b)]


class _ChannelCorr:
    """Running float64 sums for the channel x channel Pearson correlations of pairs with matching positions."""

    def __init__(self, feats_a: list[Tensor], feats_b: list[Tensor]):
        self.pairs = _matching_pairs(feats_a, feats_b, spatial_only=True)
        self.sums: dict[Any, Tensor] = {}
        self.count: dict[int, int] = {}
        self.n = 0

    def _add(self, key: Any, value: Tensor) -> None:
        self.sums[key] = self.sums[key] + value if key in self.sums else value

    def update(self, feats_a: list[Tensor], feats_b: list[Tensor]) -> None:
        pixels_a = {i: _pixels(feats_a[i]) for i in {i for i, _ in self.pairs}}
        pixels_b = {j: _pixels(feats_b[j]) for j in {j for _, j in self.pairs}}
        for side, pixels in (("a", pixels_a), ("b", pixels_b)):
            for i, p in pixels.items():
                self._add((side, i, "s"), p.sum(0))
                self._add((side, i, "q"), (p * p).sum(0))
                if side == "a":
                    self.count[i] = self.count.get(i, 0) + p.shape[0]
        for i, j in self.pairs:
            self._add(("ab", i, j), pixels_a[i].mT @ pixels_b[j])
        self.n += feats_a[0].shape[0]

    def matrix(self, i: int, j: int) -> Tensor:
        """Correlations (C_a, C_b); NaN for channels that do not vary."""
        m = self.count[i]
        mean_a, mean_b = self.sums[("a", i, "s")] / m, self.sums[("b", j, "s")] / m
        var_a = (self.sums[("a", i, "q")] / m - mean_a ** 2).clamp_min(0)
        var_b = (self.sums[("b", j, "q")] / m - mean_b ** 2).clamp_min(0)
        cov = self.sums[("ab", i, j)] / m - torch.outer(mean_a, mean_b)
        std = torch.outer(var_a.sqrt(), var_b.sqrt())
        tiny = 1e-12 * torch.outer(self.sums[("a", i, "q")] / m, self.sums[("b", j, "q")] / m).clamp_min(1e-300)
        return torch.where(std * std > tiny, cov / std, torch.full_like(cov, float("nan"))).clamp(-1, 1)

    def value(self, i: int, j: int) -> float:
        corr = self.matrix(i, j)
        varying_b = ~torch.isnan(corr).all(0)
        if not varying_b.any():
            raise UserError("no channel varies over the data")
        best = torch.nan_to_num(corr[:, varying_b], nan=-1.0).max(0).values
        return best.mean().item()


class _L2:
    def __init__(self, feats_a: list[Tensor], feats_b: list[Tensor]):
        self.pairs = _matching_pairs(feats_a, feats_b, spatial_only=False)
        self.sums, self.count, self.n = {p: 0.0 for p in self.pairs}, {p: 0 for p in self.pairs}, 0

    def update(self, feats_a: list[Tensor], feats_b: list[Tensor]) -> None:
        for i, j in self.pairs:
            diff = feats_a[i].double() - feats_b[j].double()
            self.sums[(i, j)] += diff.square().sum().item()
            self.count[(i, j)] += diff.numel()
        self.n += feats_a[0].shape[0]

    def value(self, i: int, j: int) -> float:
        return self.sums[(i, j)] / self.count[(i, j)]


# ----------------------------------------------------------------------------------------------------- full data

def lr_r2(x: Tensor, y: Tensor) -> Tensor:
    """Centred linear-regression R^2 of ``y`` (n, ...) on ``x`` (n, ...): the fraction of ``y``'s variance that the
    best affine map of ``x`` explains, ``||Q_x^T Y_c||^2 / ||Y_c||^2`` with ``Q_x`` an orthonormal basis of ``X_c``'s
    columns. Needs more samples than ``x`` has features (else it is trivially 1).

    Raises:
        UserError: different sample counts, ``n <= d_x + 1``, or a ``y`` that does not vary.
    """
    with full_precision(x.device.type):
        x, y = x.reshape(x.shape[0], -1).double(), y.reshape(y.shape[0], -1).double()
        if x.shape[0] != y.shape[0]:
            raise UserError(f"lr_r2 between {x.shape[0]} and {y.shape[0]} samples")
        _check_more_samples("lr_r2", x.shape[0], x.shape[1])
        xc, yc = x - x.mean(0), y - y.mean(0)
        total = yc.square().sum()
        if not total > 0:
            raise UserError("lr_r2: the regressed layer does not vary over the data")
        q = _column_basis(xc)
        return (q.mT @ yc).square().sum() / total


def _column_basis(xc: Tensor) -> Tensor:
    """An orthonormal basis of the column space of ``xc`` (rank-revealing: SVD, tiny singular values dropped)."""
    u, s, _ = torch.linalg.svd(xc, full_matrices=False)
    keep = s > s.max() * max(xc.shape) * torch.finfo(s.dtype).eps if s.numel() else s > 0
    return u[:, keep]


def _check_more_samples(measure: str, n: int, d: int, layer: str = "") -> None:
    if n <= d + 1:
        where = f"layer {layer!r} has" if layer else "the features have"
        raise UserError(f"measure {measure} needs more samples than features: {where} {d} features but only {n} "
                        f"samples are compared (give more samples, raise full_samples, pool conv maps with spatial: "
                        f"mean, or drop {measure})")


def _reduced(x: Tensor) -> Tensor:
    """Centred float64 features, rotated onto their row space when wider than the batch: n x min(n, d) columns
    with the same Gram matrix. Procrustes, CCA, SVCCA and LR R^2 are invariant to rotations of the features, so
    this is exact for them and makes each layer's QR once instead of once per pair (PWCCA is not invariant, but it
    needs n > d, where nothing is rotated)."""
    x = x.reshape(x.shape[0], -1).double()
    x = x - x.mean(0)
    if x.shape[1] <= x.shape[0]:
        return x
    return x @ torch.linalg.qr(x.mT).Q


# The measures of the compare stage's own: the streaming ones and lr_r2. Every similarity measure (``SIMILARITIES``,
# plug-ins included) is a full-data compare measure too, so a new full-data measure is registered once, as a
# similarity; a streaming measure of your own is a ``Measure`` with a ``start`` registered here.
MEASURES = Registry("compare measure", group="compare_measures")
for _measure in (
    Measure("cka_minibatch", "minibatch linear CKA, unbiased HSIC summed over batches in float64",
            start=_MinibatchCKA, summarize=linear_gram,
            sketch_summarize=lambda x, sketch: sketch.grams(x)),
    Measure("channel_corr", "mean over b's channels of the best Pearson correlation with a channel of a",
            start=_ChannelCorr),
    Measure("l2", "mean squared difference of all entries (a distance)", distance=True,
            start=_L2),
    Measure("lr_r2", "centred linear-regression R^2 of b on a", needs_more_samples_than_features="a",
            pair=lr_r2),
):
    MEASURES.register(_measure.name, doc=_measure.description)(_measure)


# ----------------------------------------------------------------------------------------------------- entry

def _input_of(batch: Any) -> Tensor:
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    if isinstance(batch, dict) and isinstance(batch.get("x", batch.get("input")), Tensor):
        return batch.get("x", batch.get("input"))
    raise UserError(f"compare: a batch must be a tensor or a tuple whose first element is the input, got "
                    f"{type(batch).__name__}")


MAX_DEFAULT_LAYERS = 50  # leaf modules compared when no layers are named: a 50 x 50 heatmap stays readable


def default_layers(model: nn.Module, label: str) -> list[str]:
    """Every leaf module of ``model`` (one without children) by name, thinned evenly to MAX_DEFAULT_LAYERS."""
    import warnings

    leaves = [name for name, module in model.named_modules() if name and not any(True for _ in module.children())]
    if not leaves:
        raise UserError(f"{label}: the model has no sub-modules to compare; name its layers (layers_a, layers_b)")
    if len(leaves) > MAX_DEFAULT_LAYERS:
        step = (len(leaves) - 1) / (MAX_DEFAULT_LAYERS - 1)
        kept = [leaves[round(i * step)] for i in range(MAX_DEFAULT_LAYERS)]
        warnings.warn(f"{label}: {len(leaves)} leaf modules; comparing {MAX_DEFAULT_LAYERS} evenly spaced ones from "
                      f"{kept[0]} to {kept[-1]} (name layers_a / layers_b to choose)", stacklevel=3)
        leaves = kept
    return leaves


def compare_models(model_a: nn.Module, model_b: nn.Module, loader: Iterable[Any], *,
                   layers_a: LayerSpec | Sequence[LayerSpec] | None = None,
                   layers_b: LayerSpec | Sequence[LayerSpec] | None = None,
                   measures: Sequence[str] = ("cka_minibatch",), full_samples: int = 2048, max_samples: Optional[int]
                   = None, spatial: Spatial = "flatten", device: Optional[torch.device | str] = None,
                   labels: tuple[str, str] = ("model A", "model B"),
                   progress: Optional[Callable[[int], None]] = None, sketch_features: Optional[int] = None,
                   seed: int = 0, measure_options: Optional[dict[str, dict[str, Any]]] = None) -> Comparison:
    """Compare every selected layer of ``model_a`` with every selected layer of ``model_b`` on the same inputs.

    Args:
        model_a, model_b: the networks (may be the same object: a self-comparison). Put in evaluation mode for the
            comparison, their modes restored afterwards; no gradients are computed.
        loader: an iterable of batches (tensor, or tuple/list whose first element is the input).
        layers_a, layers_b: module names, glob patterns (``bn*``), and/or types (``type:Conv2d``), as
            ``instill.compare.capture`` selects them; ``layers_b`` defaults to ``layers_a``, and both left out compare
            every leaf module of each model (torch-cka's default; more than ``MAX_DEFAULT_LAYERS`` are thinned to
            that many, evenly spaced, with a warning that names how many were left out). Layer order is the order in
            which the layers run. A layer called more than once per forward (a weight-tied block applied four
            times, a ReLU module reused in a block) gives one row per call: ``name``, ``name@1``, ...
        measures: names from ``measure_names()``: see the module docstring, ``instill list measures``.
        full_samples: the cap on the samples that full-data measures keep (they need them all at once).
        max_samples: stop after this many samples (default: the whole loader).
        spatial: ``flatten`` (each sample's whole map) or ``mean`` (conv maps averaged over positions first).
        device: where the models run and statistics accumulate (default: where ``model_a``'s parameters are).
        labels: the two models' names for plots.
        progress: called with the number of samples seen after every batch.
        sketch_features: the approximate mode (``cka_minibatch`` only): every layer wider than this is projected
            to this many features by a fixed Gaussian random matrix before its Gram matrix (``Sketch``).
        seed: the sketch's projections are drawn from it (the compare stage passes its run seed: a replay draws
            the same ones).
        measure_options: ``{measure: {option: value}}`` for similarity measures of your own that take options.

    Returns:
        A ``Comparison``: rows (layer_a, layer_b, measure, value, n), ``matrix(measure)``, ``heatmap(measure)``.

    Raises:
        UserError: an unknown measure or layer (nearest names listed), a batch the models cannot take, a full-data
        measure that needs more samples than it was given (``n <= d + 1``), a layer that does not vary, a sketch
        asked of a measure that cannot use it.
    """
    measures = list(dict.fromkeys(measures))
    chosen = chosen_measures(measures, measure_options or {})
    if full_samples < 2:
        raise UserError(f"full_samples must be at least 2, got {full_samples}")
    if sketch_features is not None:
        check_sketchable(measures)
        sketch = Sketch(sketch_features, seed)
        chosen = {name: replace(m, summarize=partial(m.sketch_summarize, sketch=sketch)) for name, m in chosen.items()}
    if layers_a is None and layers_b is None:
        layers_a, layers_b = default_layers(model_a, labels[0]), default_layers(model_b, labels[1])
    layers_b = layers_a if layers_b is None else layers_b
    if device is None:
        device = next((p.device for p in model_a.parameters()), torch.device("cpu"))
    device = torch.device(device)
    modes = (model_a.training, model_b.training)
    model_a.eval(), model_b.eval()
    features = partial(_features, spatial=spatial)
    # Streaming measures that all keep the same summary of a layer (cka_minibatch: its Gram matrix) have it made in
    # the hook from the fresh output, which is dropped at once (no copy, no n x d tensor kept past its layer). Its
    # finiteness is checked on the summaries (``_check_finite``), not on the activation.
    summaries = {m.summarize for m in chosen.values()}
    in_hook = all(m.streaming for m in chosen.values()) and len(summaries) == 1 and None not in summaries
    if in_hook:
        summarize = summaries.pop()
        options_a = options_b = {"transform": lambda t: summarize(features(t))}
    else:  # the activations themselves are kept: copied (in-place layers follow), checked finite in the hook
        options_a, options_b = ({"clone": True, "finite": label} for label in labels)
    capture_a = FeatureCapture(model_a, layers_a, **options_a)
    capture_b = FeatureCapture(model_b, layers_b, **options_b)
    try:
        with torch.no_grad(), capture_a, capture_b:
            return _stream(model_a, model_b, capture_a, capture_b, loader, chosen, full_samples, max_samples,
                           features, device, labels, progress, in_hook)
    finally:
        model_a.train(modes[0]), model_b.train(modes[1])


class Sketch:
    """The approximate mode of minibatch CKA: each layer's flattened features ``X`` (n, d) projected by two
    independent d x k/2 Gaussian matrices ``R1``, ``R2`` with entries of variance 2/k, giving two Gram matrices
    ``K1 = X R1 R1^T X^T`` and ``K2``, each an unbiased estimate of ``X X^T`` at k/(2d) of its product's cost (plus
    the projection's n d k). HSIC is bilinear, so the products of the two independent halves are unbiased: a
    layer's self-HSIC from (K1, K2), a pair's from (K1_a, K2_b) and (K2_a, K1_b) averaged. (One projection of both
    sides would bias every self-HSIC up by about its effective rank / k, and CKA down with it: 0.71 read 0.09 at
    k = 16 on a test convnet.) Layers of at most k features keep their exact Gram matrix (as both halves).

    The projections depend on the seed and the width alone: two layers of the same width share them (a model
    compared with itself keeps exactly 1 on its diagonal), every batch sees the same ones, and a replay draws them
    again from the run seed. Errors against the exact values: ``bench/compare.py --sketch``, docs/results.md."""

    def __init__(self, features: int, seed: int):
        if isinstance(features, bool) or not isinstance(features, int) or features < 2 or features % 2:
            raise UserError(f"sketch_features must be an even whole number of features, at least 2 (two independent "
                            f"halves), got {features!r}")
        self.features, self.seed = features, seed
        self._projections: dict[tuple[int, torch.device], Tensor] = {}

    def _projection(self, width: int, device: torch.device) -> Tensor:
        """(2, width, k/2): both halves' matrices, drawn once per width from the seed."""
        key = (width, device)
        if key not in self._projections:
            generator = torch.Generator().manual_seed(derive_seed(self.seed, f"sketch/{width}"))
            half = self.features // 2
            projection = torch.randn(2, width, half, generator=generator) / math.sqrt(half)
            self._projections[key] = projection.to(device)
        return self._projections[key]

    def grams(self, x: Tensor) -> Tensor:
        """The two halves' Gram matrices of the samples ``x`` (n, ...): a (2, n, n) stack."""
        flat = x.reshape(x.shape[0], -1).float()
        if flat.shape[1] <= self.features:
            return linear_gram(flat).expand(2, -1, -1)
        with full_precision(flat.device.type):
            projected = flat @ self._projection(flat.shape[1], flat.device)  # (2, n, k/2)
            return projected @ projected.mT


def _stream(model_a, model_b, capture_a, capture_b, loader, chosen: dict[str, Measure], full_samples, max_samples,
            features, device, labels, progress, in_hook) -> Comparison:
    names_a = names_b = None
    streams: dict[str, Stream] = {}
    kept_a: list[list[Tensor]] = []
    kept_b: list[list[Tensor]] = []
    full = [name for name, m in chosen.items() if not m.streaming]
    seen = kept = 0
    for batch in loader:
        x = _input_of(batch)
        if max_samples is not None:
            if seen >= max_samples:
                break
            x = x[: max_samples - seen]
        x = x.to(device)
        try:
            model_a(x)
            if model_b is not model_a:  # a self-comparison: both captures hook the one forward
                model_b(x)
        except (RuntimeError, ValueError) as err:
            raise UserError(f"compare: the models cannot take inputs of shape {tuple(x.shape)}: "
                            f"{(str(err).splitlines() or [''])[0][:200]}") from None
        got_a, got_b = capture_a.pop(strict=True), capture_b.pop(strict=True)
        if names_a is None:  # first batch: fix the layer order (every call of every layer)
            names_a, names_b = list(got_a), list(got_b)
        _check_same_calls(got_a, names_a, labels[0])
        _check_same_calls(got_b, names_b, labels[1])
        if in_hook:
            feats_a, feats_b = [got_a[k] for k in names_a], [got_b[k] for k in names_b]
            _check_finite(feats_a, names_a, labels[0])
            _check_finite(feats_b, names_b, labels[1])
            inputs = {name: (feats_a, feats_b) for name in chosen}
        else:
            feats_a, feats_b = [features(got_a[k]) for k in names_a], [features(got_b[k]) for k in names_b]
            inputs = {name: _summaries(m, feats_a, feats_b) for name, m in chosen.items() if m.streaming}
        for name, (summaries_a, summaries_b) in inputs.items():
            if name not in streams:
                streams[name] = chosen[name].start(summaries_a, summaries_b)
            streams[name].update(summaries_a, summaries_b)
        if full and kept < full_samples:
            take = min(full_samples - kept, x.shape[0])
            kept_a.append([f[:take].cpu() for f in feats_a])
            kept_b.append([f[:take].cpu() for f in feats_b])
            kept += take
        seen += x.shape[0]
        if progress is not None:
            progress(seen)
    if names_a is None:
        raise UserError("compare: the data gave no batch")
    result = Comparison(names_a, names_b, list(chosen), labels=labels)
    for name, stream in streams.items():
        _add_stream_rows(result, name, stream, names_a, names_b, feats_a, feats_b)
    if full:
        feats_a = [torch.cat([b[i] for b in kept_a]) for i in range(len(names_a))]
        feats_b = [torch.cat([b[j] for b in kept_b]) for j in range(len(names_b))]
        check_sample_counts(full, kept, {k: f[0].numel() for k, f in zip(names_a, feats_a)},
                            {k: f[0].numel() for k, f in zip(names_b, feats_b)})
        for name in full:
            _add_rows(result, name, chosen[name].matrix(feats_a, feats_b), names_a, names_b, kept)
    return result


def _summaries(measure: Measure, feats_a: list[Tensor], feats_b: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
    if measure.summarize is None:
        return feats_a, feats_b
    return [measure.summarize(x) for x in feats_a], [measure.summarize(y) for y in feats_b]


def _check_finite(summaries: list[Tensor], names: list[str], label: str) -> None:
    """Refuse a batch whose summaries (one per layer) hold NaN or inf, in one reduction for all layers: a NaN or inf
    in an activation reaches its Gram matrix's diagonal (a sum of squares), and a Gram matrix that overflowed is
    no use either."""
    totals = torch.stack([s.double().sum() for s in summaries])
    if not bool(torch.isfinite(totals.sum())):
        bad = next(name for name, total in zip(names, totals.tolist()) if not math.isfinite(total))
        raise UserError(f"{label}: the output of layer {bad!r} holds NaN or inf on this data, or values too large to "
                        "square in float32 (its weights are finite: check the input data)")


def check_sketchable(measures: Sequence[str]) -> None:
    """UserError unless every measure can use the approximate mode (it depends on Gram matrices alone)."""
    if exact := [name for name in measures if get_measure(name).sketch_summarize is None]:
        raise UserError(f"sketch_features approximates measures computed from Gram matrices alone (cka_minibatch); "
                        f"{', '.join(exact)} cannot use it (drop sketch_features for exact values)")


def _check_same_calls(got: dict[str, Tensor], names: list[str], label: str) -> None:
    """A layer must run as often in every batch: its calls are the rows of the comparison."""
    if list(got) != names:
        changed = sorted(set(got) ^ set(names))
        raise UserError(f"compare: the layers of {label} ran a different number of times in a later batch than in the "
                        f"first ({', '.join(changed[:4])}): their calls cannot be matched across batches")


def check_sample_counts(measures: Sequence[str], n: int, features_a: dict[str, int], features_b: dict[str, int]
                        ) -> None:
    """UserError when a full-data measure would be degenerate: ``n <= d + 1`` for a layer it regresses on."""
    for name in measures:
        need = get_measure(name).needs_more_samples_than_features
        sides = [] if need == "none" else [features_a] if need == "a" else [features_a, features_b]
        for side in sides:
            layer, d = max(side.items(), key=lambda item: item[1])
            _check_more_samples(name, n, d, layer)


def _add_stream_rows(result: Comparison, measure: str, stream: Stream, names_a, names_b, last_a, last_b) -> None:
    """A stream's values in rows; the pairs it does not compare listed in ``result.skipped`` with their shapes."""
    pairs = set(stream.pairs)
    skipped = [f"{a}~{b}: shapes {tuple(last_a[i].shape[1:])} and {tuple(last_b[j].shape[1:])}"
               for i, a in enumerate(names_a) for j, b in enumerate(names_b) if (i, j) not in pairs]
    if skipped:
        result.skipped[measure] = skipped
    for i, j in stream.pairs:
        try:
            value = stream.value(i, j)
        except UserError as err:
            raise UserError(f"{measure} of {names_a[i]}~{names_b[j]}: {err}") from None
        if not math.isfinite(value):
            raise UserError(f"{measure} of {names_a[i]}~{names_b[j]} is {value}: the activations are not finite or "
                            "do not vary")
        result.rows.append({"layer_a": names_a[i], "layer_b": names_b[j], "measure": measure, "value": value,
                            "n": stream.n})


def _add_rows(result: Comparison, measure: str, values: np.ndarray, names_a, names_b, n: int) -> None:
    for i, a in enumerate(names_a):
        for j, b in enumerate(names_b):
            value = float(values[i, j])
            if not math.isfinite(value):
                raise UserError(f"{measure} of {a}~{b} is {value}: the activations are not finite or do not vary")
            result.rows.append({"layer_a": a, "layer_b": b, "measure": measure, "value": value, "n": n})
