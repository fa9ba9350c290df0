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
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Literal, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import UserError, unknown_name
from ..registry import Registry
from .capture import FeatureCapture, LayerSpec
from .similarity import (SIMILARITIES, Similarity, cka_from_grams, centered_gram, full_precision, get_similarity,
                         pearson, similarity_matrix)
from ..files import csv_text

Spatial = Literal["flatten", "mean"]
UNBIASED_MIN_BATCH = 4


@dataclass(frozen=True)
class Measure:
    """A measure ``compare_models`` can accumulate."""

    name: str
    streaming: bool  # statistics of fixed size (True) or the first ``full_samples`` samples (False)
    description: str
    distance: bool = False  # 0 = identical (l2); otherwise 1 = most similar
    needs_more_samples_than_features: Literal["none", "both", "a"] = "none"
    pair: Optional[Callable[[Tensor, Tensor], Tensor]] = None  # a full-data measure's value for one pair of layers

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        if self.pair is None:
            raise UserError(f"measure {self.name} is a streaming measure: compare_models computes it over batches")
        return self.pair(x, y)

    @classmethod
    def of(cls, similarity: Similarity) -> "Measure":
        """A similarity measure as a full-data compare measure."""
        return cls(similarity.name, False, similarity.description,
                   needs_more_samples_than_features=similarity.needs_more_samples_than_features, pair=similarity.pair)


# The measures of the compare stage's own: the streaming ones and lr_r2. Every similarity measure (``SIMILARITIES``,
# plug-ins included) is a full-data compare measure too, so a new measure is registered once, as a similarity.
MEASURES = Registry("compare measure", group="compare_measures")
for _measure in (
    Measure("cka_minibatch", True, "minibatch linear CKA, unbiased HSIC summed over batches in float64"),
    Measure("channel_corr", True, "mean over b's channels of the best Pearson correlation with a channel of a"),
    Measure("l2", True, "mean squared difference of all entries (a distance)", distance=True),
    Measure("lr_r2", False, "centred linear-regression R^2 of b on a", needs_more_samples_than_features="a",
            pair=lambda x, y: lr_r2(x, y)),
):
    MEASURES.register(_measure.name, doc=_measure.description)(_measure)


def measure_names() -> list[str]:
    """Every name ``compare_models`` accepts: its own measures and the similarity measures."""
    return sorted(MEASURES.names() + SIMILARITIES.names())


def get_measure(name: str) -> Measure:
    """The compare measure called ``name``, or the similarity measure of that name computed on full data; a
    UserError naming the nearest known names otherwise."""
    if name in MEASURES and isinstance(MEASURES.get(name).build, Measure):
        return MEASURES.get(name).build
    if name in SIMILARITIES or ":" in name:  # an import path: a similarity function (its import error, if any)
        return Measure.of(get_similarity(name))
    raise unknown_name("measure", name, measure_names() + list(SIMILARITIES.aliases))


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
        from ..report import plot_heatmap

        return plot_heatmap(self.matrix(measure), self.layers_a, self.layers_b, path=path,
                            title=f"{measure} ({get_measure(measure).description})", xlabel=self.labels[1],
                            ylabel=self.labels[0], annotate=annotate,
                            limits=None if get_measure(measure).distance else (0.0, 1.0))


# ----------------------------------------------------------------------------------------------------- streaming

def _features(tensor: Tensor, spatial: Spatial) -> Tensor:
    """A capture as the measures see it: (n, ...) in float32, conv maps pooled to channels with ``mean``."""
    tensor = tensor.float()
    if spatial == "mean" and tensor.dim() > 2:
        tensor = tensor.flatten(2).mean(2)
    return tensor


def linear_gram(x: Tensor) -> Tensor:
    """``X X^T`` (n x n) of the flattened samples, float32 at full precision."""
    with full_precision(x.device.type):
        flat = x.reshape(x.shape[0], -1).float()
        return flat @ flat.mT


def _u_centred(grams: Sequence[Tensor]) -> Tensor:
    """U-centring (Szekely and Rizzo 2014) in float64 of L raw Gram matrices: a (L, n, n) stack."""
    k = torch.stack(list(grams)).double()
    n = k.shape[-1]
    off_diagonal = 1 - torch.eye(n, dtype=k.dtype, device=k.device)
    k = k * off_diagonal
    rows = k.sum(-1, keepdim=True)
    total = rows.sum(-2, keepdim=True)
    k = k - rows / (n - 2) - rows.mT / (n - 2) + total / ((n - 1) * (n - 2))
    return k * off_diagonal


class _MinibatchCKA:
    """Sums of unbiased HSIC over batches for every pair: one Gram matrix per layer per batch, one matmul for all
    pairs."""

    def __init__(self, count_a: int, count_b: int, device: torch.device):
        self.ab = torch.zeros(count_a, count_b, dtype=torch.float64, device=device)
        self.aa = torch.zeros(count_a, dtype=torch.float64, device=device)
        self.bb = torch.zeros(count_b, dtype=torch.float64, device=device)
        self.n = 0

    def update(self, feats_a: list[Tensor], feats_b: list[Tensor], grams: bool = False) -> None:
        """Add one batch: the layers' features (n, ...), or (``grams``) their raw Gram matrices (n, n)."""
        n = feats_a[0].shape[0]
        if n < UNBIASED_MIN_BATCH:
            return
        if not grams:
            feats_a, feats_b = [linear_gram(x) for x in feats_a], [linear_gram(y) for y in feats_b]
        ka, kb = _u_centred(feats_a).flatten(1), _u_centred(feats_b).flatten(1)
        scale = 1.0 / (n * (n - 3))
        self.ab += (ka @ kb.mT) * scale
        self.aa += (ka * ka).sum(1) * scale
        self.bb += (kb * kb).sum(1) * scale
        self.n += n

    def values(self, names_a: list[str], names_b: list[str]) -> np.ndarray:
        if self.n == 0:
            raise UserError(f"cka_minibatch needs batches of at least {UNBIASED_MIN_BATCH} samples; none was")
        for names, self_hsic in ((names_a, self.aa), (names_b, self.bb)):
            flat = [name for name, h in zip(names, self_hsic.tolist()) if not h > 0]
            if flat:
                raise UserError(f"cka_minibatch: layer {flat[0]!r} does not vary over the data (its HSIC with itself "
                                f"is {self_hsic[names.index(flat[0])].item():.3g}): CKA is undefined")
        return (self.ab / torch.outer(self.aa, self.bb).sqrt()).cpu().numpy()


def _pixels(x: Tensor) -> Tensor:
    """(n, C, ...) -> (n * pixels, C): channels as variables, every position of every sample as an observation."""
    return x.movedim(1, -1).reshape(-1, x.shape[1]).double() if x.dim() > 2 else x.reshape(x.shape[0], -1).double()


class _ChannelCorr:
    """Running float64 sums for the channel x channel Pearson correlations of pairs with matching positions."""

    def __init__(self, pairs: list[tuple[int, int]]):
        self.pairs = pairs
        self.sums: dict[Any, Tensor] = {}
        self.count: dict[int, int] = {}

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

    def value(self, i: int, j: int, pair: str) -> float:
        corr = self.matrix(i, j)
        varying_b = ~torch.isnan(corr).all(0)
        if not varying_b.any():
            raise UserError(f"channel_corr of {pair}: no channel varies over the data")
        best = torch.nan_to_num(corr[:, varying_b], nan=-1.0).max(0).values
        return best.mean().item()


class _L2:
    def __init__(self, pairs: list[tuple[int, int]]):
        self.pairs, self.sums, self.count = pairs, {p: 0.0 for p in pairs}, {p: 0 for p in pairs}

    def update(self, feats_a: list[Tensor], feats_b: list[Tensor]) -> None:
        for i, j in self.pairs:
            diff = feats_a[i].double() - feats_b[j].double()
            self.sums[(i, j)] += diff.square().sum().item()
            self.count[(i, j)] += diff.numel()

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


def _full_matrix(name: str, feats_a: list[Tensor], feats_b: list[Tensor]) -> np.ndarray:
    """``name`` for every pair, sharing each layer's n x n matrix where the measure allows it."""
    values = np.empty((len(feats_a), len(feats_b)))
    if name in ("cka", "cka_unbiased"):
        grams_a = [centered_gram(x.double()) for x in feats_a]
        grams_b = [centered_gram(y.double()) for y in feats_b]
        for i, k in enumerate(grams_a):
            for j, l in enumerate(grams_b):
                values[i, j] = cka_from_grams(k, l, unbiased=name == "cka_unbiased").item()
    elif name in ("rsa", "rsa_classic"):
        variant = "original" if name == "rsa" else "classic"
        mats_a = [similarity_matrix(x.double(), variant) for x in feats_a]
        mats_b = [similarity_matrix(y.double(), variant) for y in feats_b]
        n = feats_a[0].shape[0]
        rows, cols = torch.triu_indices(n, n, offset=1)
        pick = (lambda m: m[rows, cols]) if variant == "classic" else (lambda m: m.flatten())
        for i, ma in enumerate(mats_a):
            for j, mb in enumerate(mats_b):
                values[i, j] = pearson(pick(ma), pick(mb)).item()
    else:
        fn = get_measure(name).pair
        reduced_a, reduced_b = [_reduced(x) for x in feats_a], [_reduced(y) for y in feats_b]
        for i, x in enumerate(reduced_a):
            for j, y in enumerate(reduced_b):
                values[i, j] = fn(x, y).item()
    return values


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
                   progress: Optional[Callable[[int], None]] = None) -> Comparison:
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

    Returns:
        A ``Comparison``: rows (layer_a, layer_b, measure, value, n), ``matrix(measure)``, ``heatmap(measure)``.

    Raises:
        UserError: an unknown measure or layer (nearest names listed), a batch the models cannot take, a full-data
        measure that needs more samples than it was given (``n <= d + 1``), a layer that does not vary.
    """
    measures = list(dict.fromkeys(measures))
    for name in measures:
        get_measure(name)
    if full_samples < 2:
        raise UserError(f"full_samples must be at least 2, got {full_samples}")
    if layers_a is None and layers_b is None:
        layers_a, layers_b = default_layers(model_a, labels[0]), default_layers(model_b, labels[1])
    layers_b = layers_a if layers_b is None else layers_b
    if device is None:
        device = next((p.device for p in model_a.parameters()), torch.device("cpu"))
    device = torch.device(device)
    modes = (model_a.training, model_b.training)
    model_a.eval(), model_b.eval()
    # Minibatch CKA alone needs only each layer's Gram matrix: the hooks form it from the fresh output and drop the
    # activation at once (no copy, no n x d tensor kept past its layer).
    grams_only = measures == ["cka_minibatch"]
    options = {"transform": lambda t: linear_gram(_features(t, spatial))} if grams_only else {"clone": True}
    capture_a = FeatureCapture(model_a, layers_a, **options)
    capture_b = FeatureCapture(model_b, layers_b, **options)
    try:
        with torch.no_grad(), capture_a, capture_b:
            return _stream(model_a, model_b, capture_a, capture_b, loader, measures, full_samples, max_samples,
                           spatial, device, labels, progress, grams_only)
    finally:
        model_a.train(modes[0]), model_b.train(modes[1])


def _stream(model_a, model_b, capture_a, capture_b, loader, measures, full_samples, max_samples, spatial, device,
            labels, progress, grams_only) -> Comparison:
    names_a = names_b = None
    streams: dict[str, Any] = {}
    kept_a: list[list[Tensor]] = []
    kept_b: list[list[Tensor]] = []
    full = [m for m in measures if not get_measure(m).streaming]
    seen = kept = 0
    skipped: dict[str, list[str]] = {}
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
        if names_a is None:  # first batch: fix the layer order (every call of every layer), choose the pairs
            names_a, names_b = list(got_a), list(got_b)
        _check_same_calls(got_a, names_a, labels[0])
        _check_same_calls(got_b, names_b, labels[1])
        if grams_only:
            streams = streams or {"cka_minibatch": _MinibatchCKA(len(names_a), len(names_b), device)}
            streams["cka_minibatch"].update([got_a[k] for k in names_a], [got_b[k] for k in names_b], grams=True)
            seen += x.shape[0]
            if progress is not None:
                progress(seen)
            continue
        feats_a = [_features(got_a[k], spatial) for k in names_a]
        feats_b = [_features(got_b[k], spatial) for k in names_b]
        if not streams:
            streams = _start_streams(measures, feats_a, feats_b, names_a, names_b, device, skipped)
        for stream in streams.values():
            stream.update(feats_a, feats_b)
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
    result = Comparison(names_a, names_b, measures, skipped=skipped, labels=labels)
    _collect_streams(result, streams, names_a, names_b, seen)
    if full:
        feats_a = [torch.cat([b[i] for b in kept_a]) for i in range(len(names_a))]
        feats_b = [torch.cat([b[j] for b in kept_b]) for j in range(len(names_b))]
        check_sample_counts(full, kept, {k: f[0].numel() for k, f in zip(names_a, feats_a)},
                            {k: f[0].numel() for k, f in zip(names_b, feats_b)})
        for name in full:
            values = _full_matrix(name, feats_a, feats_b)
            _add_rows(result, name, values, names_a, names_b, kept)
    return result


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


def _pair_shapes_match(a: Tensor, b: Tensor, spatial_only: bool) -> bool:
    if spatial_only:
        return a.dim() == b.dim() and tuple(a.shape[2:]) == tuple(b.shape[2:])
    return tuple(a.shape[1:]) == tuple(b.shape[1:])


def _start_streams(measures, feats_a, feats_b, names_a, names_b, device, skipped) -> dict[str, Any]:
    streams: dict[str, Any] = {}
    for name in measures:
        if name == "cka_minibatch":
            streams[name] = _MinibatchCKA(len(feats_a), len(feats_b), device)
        elif name in ("channel_corr", "l2"):
            spatial_only = name == "channel_corr"
            pairs = [(i, j) for i, a in enumerate(feats_a) for j, b in enumerate(feats_b)
                     if _pair_shapes_match(a, b, spatial_only)]
            skipped[name] = [f"{names_a[i]}~{names_b[j]}: shapes {tuple(a.shape[1:])} and {tuple(b.shape[1:])}"
                             for i, a in enumerate(feats_a) for j, b in enumerate(feats_b) if (i, j) not in pairs]
            streams[name] = _ChannelCorr(pairs) if spatial_only else _L2(pairs)
    return streams


def _collect_streams(result: Comparison, streams: dict[str, Any], names_a, names_b, seen: int) -> None:
    for name, stream in streams.items():
        if name == "cka_minibatch":
            _add_rows(result, name, stream.values(names_a, names_b), names_a, names_b, stream.n)
            continue
        for i, j in stream.pairs:
            pair = f"{names_a[i]}~{names_b[j]}"
            value = stream.value(i, j, pair) if name == "channel_corr" else stream.value(i, j)
            result.rows.append({"layer_a": names_a[i], "layer_b": names_b[j], "measure": name, "value": value,
                                "n": seen})


def _add_rows(result: Comparison, measure: str, values: np.ndarray, names_a, names_b, n: int) -> None:
    for i, a in enumerate(names_a):
        for j, b in enumerate(names_b):
            value = float(values[i, j])
            if not math.isfinite(value):
                raise UserError(f"{measure} of {a}~{b} is {value}: the activations are not finite or do not vary")
            result.rows.append({"layer_a": a, "layer_b": b, "measure": measure, "value": value, "n": n})
