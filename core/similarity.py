"""Representational similarity between two sets of activations of the same ``n`` samples.

Every measure takes ``x`` of shape ``(n, ...)`` and ``y`` of shape ``(n, ...)``, flattens each sample, and returns a
0-d tensor (1 = most similar). All are computed in float32 or better with autocast off and full-precision matmuls,
whatever the caller's precision settings (bf16 Gram matrices are off by ~1e-3, the size of 1 - CKA for wide layers).

Linear CKA (Kornblith et al. 2019). With ``K = X X^T``, ``L = Y Y^T`` and a centring ``C``:
``CKA = <C(K), C(L)> / (||C(K)|| ||C(L)||)``.

- biased (``unbiased=False``, the original code): ``C(K) = H K H``, ``H = I - 11^T/n``.
- unbiased (Song et al. 2012; minibatch CKA of Nguyen et al. 2021): ``C`` is U-centring (zero the diagonal, subtract
  row and column sums / (n-2), add the total / ((n-1)(n-2)), zero the diagonal again); then
  ``<C(K), C(L)> = n (n-3) HSIC_u(K, L)`` exactly, so the ratio is the unbiased CKA. Needs n >= 4.

How it is computed. ``H`` is never built: ``H K H`` is ``K`` minus its row and column means plus its mean, O(n^2)
after the one O(n^2 d) product, with the original's value and rounding. ``gram`` has a hand-written backward, one
matmul ``(G + G^T) X`` where autograd does two. The O(n^2) part has an analytic backward too: both centrings are
orthogonal projections (self-adjoint, idempotent), so the gradient with respect to ``K`` is ``dCKA/dC(K)`` itself.
When the features are narrower than the batch, the feature form ``||Y_c^T X_c||^2 / (||X_c^T X_c|| ||Y_c^T Y_c||)``
costs less and is used instead. For a frozen side (the guide) compute ``centered_gram(y)`` once under ``no_grad``,
for instance in its forward hook, dropping the activation at once, and call ``cka_with_gram(x, guide_gram)``;
``cka_summary`` / ``cka_with_summary`` do the same but keep the features instead when they are narrower than the
batch (token-level rows: n x d is then smaller than n x n, and the feature form far cheaper).

Constant layers. A side whose centred features hold at most ``eps`` of their energy (``||X_c||^2 <= eps ||X||^2``:
features constant over the batch, or a mean so far above their spread that the dtype keeps only rounding of the
centred Gram matrix) has CKA 0 with a zero gradient, never NaN. By default ``eps`` is 8 machine epsilons of the
computation's dtype (1e-6 in float32).

The other measures: RSA (the original's variant and the classic one), orthogonal Procrustes, and the CCA family
(mean CCA, SVCCA, PWCCA). ``SIMILARITIES`` names them all for configs.
"""

from __future__ import annotations

import contextlib
import difflib
import warnings
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Iterator, Literal

import torch
from torch import Tensor

from .errors import UserError

EPS_ULPS = 8  # default eps, in machine epsilons: a side whose centred features hold less energy is constant
TINY = 1e-15  # floor of a norm we divide by: far below real activations, and its square is a normal float32
UNBIASED_MIN_SAMPLES = 4  # HSIC_u divides by n (n - 3)


# ----------------------------------------------------------------------------------------------------- numerics

@contextlib.contextmanager
def full_precision(device_type: str) -> Iterator[None]:
    """Autocast off and float32 matmuls in full precision (no TF32 / bf16 passes) for the enclosed products."""
    previous = torch.get_float32_matmul_precision()
    if previous != "highest":
        torch.set_float32_matmul_precision("highest")
    try:
        with torch.autocast(device_type, enabled=False):
            yield
    finally:
        if previous != "highest":
            torch.set_float32_matmul_precision(previous)


def as_samples(x: Tensor) -> Tensor:
    """``(n, ...)`` -> ``(n, d)``, one row per sample, in float32 or better (float64 stays float64)."""
    if x.dim() == 0:
        raise UserError("a similarity needs activations of shape (n, ...), got a scalar")
    dtype = torch.promote_types(x.dtype, torch.float32) if x.is_floating_point() else torch.float32
    return x.reshape(x.shape[0], -1).to(dtype)


def _check_samples(n_x: int, n_y: int, unbiased: bool = False) -> None:
    if n_x != n_y:
        raise UserError(f"similarity between {n_x} and {n_y} samples: both sides need the same batch "
                        f"(check the declared batch axis of both layers)")
    if unbiased and n_x < UNBIASED_MIN_SAMPLES:
        raise UserError(f"unbiased CKA needs at least {UNBIASED_MIN_SAMPLES} samples, got {n_x} (use a larger batch "
                        f"or drop the last incomplete batch)")


def _unit(a: Tensor, norm: Tensor) -> Tensor:
    """``a / norm``, where ``norm`` is a norm of ``a``: an all-zero ``a`` stays zero, with a finite gradient."""
    return a / norm.clamp_min(TINY)


def _cosine(dot: Tensor, norm_sq_a: Tensor, norm_sq_b: Tensor) -> Tensor:
    # the floor sits under the square root so that its gradient stays finite at zero
    return dot / (norm_sq_a * norm_sq_b).clamp_min(TINY * TINY).sqrt()


# ----------------------------------------------------------------------------------------------------- Gram form

class _Gram(torch.autograd.Function):
    """``X X^T`` whose backward is one matmul ``(G + G^T) X`` instead of autograd's ``G X + G^T X``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        with full_precision(x.device.type):
            return x @ x.mT

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (x,) = ctx.saved_tensors
        with full_precision(x.device.type):
            return (grad + grad.mT) @ x


def gram(x: Tensor) -> Tensor:
    """The raw linear Gram matrix ``X X^T`` (n x n) of the flattened samples, float32 or better."""
    with full_precision(x.device.type):
        return _Gram.apply(as_samples(x))


def center_gram(k: Tensor) -> Tensor:
    """``H K H`` in O(n^2) for symmetric ``(..., n, n)`` Gram matrices (stacks allowed)."""
    row_means = k.mean(-1, keepdim=True)  # Gram matrices are symmetric: the column means are the same
    return k - row_means - row_means.mT + row_means.mean(-2, keepdim=True)


def centered_gram(x: Tensor) -> Tensor:
    """``H X X^T H``: what a frozen side's hook keeps (n x n) instead of its activation, for ``cka_with_gram``."""
    return center_gram(gram(x))


def _u_center(k: Tensor) -> Tensor:
    """U-centring (Szekely and Rizzo 2014); it gives the same result for ``K`` and ``H K H``."""
    n = k.shape[-1]
    diagonal = torch.eye(n, dtype=torch.bool, device=k.device)
    k = k.masked_fill(diagonal, 0)
    k = (k - k.sum(-1, keepdim=True) / (n - 2) - k.sum(-2, keepdim=True) / (n - 2)
         + k.sum((-2, -1), keepdim=True) / ((n - 1) * (n - 2)))
    return k.masked_fill(diagonal, 0)


def _eps(eps: float | None, dtype: torch.dtype) -> float:
    return EPS_ULPS * torch.finfo(dtype).eps if eps is None else eps


def _inverse_norm(centred: Tensor, k: Tensor, eps: float) -> Tensor:
    """``1 / ||centred||`` per matrix, and 0 where the side is constant (see the module docstring)."""
    n = k.shape[-1]
    energy = k.diagonal(dim1=-2, dim2=-1).sum(-1)  # ||X||^2
    varying = energy - k.sum((-2, -1)) / n  # ||X_c||^2 = trace(H K H)
    norm = torch.linalg.vector_norm(centred, dim=(-2, -1)).clamp_min(TINY)
    return torch.where(varying > eps * energy, 1 / norm, torch.zeros_like(norm))


class _CenteredCosine(torch.autograd.Function):
    """CKA of Gram matrices ``(..., n, n)``: centre both, take the cosine; the backward in closed form.

    With ``a = C(K)``, ``b = C(L)`` and ``cka = <a, b> / (|a| |b|)``: ``dcka/dK = (b / |b| - cka a / |a|) / |a|``
    (``C`` is an orthogonal projection and both terms lie in its range).
    """

    @staticmethod
    def forward(ctx: Any, k: Tensor, l: Tensor, unbiased: bool, eps: float | None) -> Tensor:
        eps = _eps(eps, k.dtype)
        centre = _u_center if unbiased else (lambda m: m)
        a, b = centre(center_gram(k)), centre(center_gram(l))
        inv_a, inv_b = _inverse_norm(a, k, eps), _inverse_norm(b, l, eps)
        cka = (a * b).sum((-2, -1)) * inv_a * inv_b
        ctx.save_for_backward(a, b, inv_a, inv_b, cka)
        return cka

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
        a, b, inv_a, inv_b, cka = ctx.saved_tensors
        grad, inv_a, inv_b, cka = (t[..., None, None] for t in (grad, inv_a, inv_b, cka))
        grad_k = grad * inv_a * (b * inv_b - cka * a * inv_a) if ctx.needs_input_grad[0] else None
        grad_l = grad * inv_b * (a * inv_a - cka * b * inv_b) if ctx.needs_input_grad[1] else None
        return grad_k, grad_l, None, None


def cka_from_grams(k: Tensor, l: Tensor, unbiased: bool = False, eps: float | None = None) -> Tensor:
    """Linear CKA of two Gram matrices, raw or doubly centred (``(..., n, n)``: a stack gives one value per pair)."""
    _check_samples(k.shape[-1], l.shape[-1], unbiased)
    dtype = torch.promote_types(torch.promote_types(k.dtype, l.dtype), torch.float32)
    with full_precision(k.device.type):
        return _CenteredCosine.apply(k.to(dtype), l.to(dtype), unbiased, eps)


def cka_with_gram(x: Tensor, guide_gram: Tensor, unbiased: bool = False, eps: float | None = None) -> Tensor:
    """Linear CKA of activations ``x`` against a cached Gram matrix of the other side (raw or ``centered_gram``)."""
    return cka_from_grams(gram(x), guide_gram, unbiased, eps)


# ----------------------------------------------------------------------------------------------------- CKA

def _gram_form_is_cheaper(n: int, d_x: int, d_y: int) -> bool:
    # multiply-adds: Gram form n^2 (d_x + d_y); feature form n (d_x d_y + d_x^2 + d_y^2)
    return n * (d_x + d_y) <= d_x * d_y + d_x * d_x + d_y * d_y


def _center_features(x: Tensor) -> Tensor:
    """Columns centred, then scaled to unit Frobenius norm (CKA and the other measures are scale-invariant)."""
    x = x - x.mean(0, keepdim=True)
    return _unit(x, torch.linalg.vector_norm(x))


def _varies(x: Tensor, eps: float | None) -> Tensor:
    return (x - x.mean(0, keepdim=True)).square().sum() > _eps(eps, x.dtype) * x.square().sum()


def _feature_hsic(xc: Tensor, yc: Tensor, cross: Tensor, unbiased: bool) -> Tensor:
    """HSIC(X, Y) * n(n-3) (unbiased) or * (n-1)^2 (biased) from centred features and ``||X_c^T Y_c||^2``."""
    if not unbiased:
        return cross
    n = xc.shape[0]
    k, l = (xc * xc).sum(1), (yc * yc).sum(1)  # the Gram diagonals; centred rows sum to zero, so 1^T K 1 = 0
    return cross - k @ l + k.sum() * l.sum() / ((n - 1) * (n - 2)) - 2 * (k @ l) / (n - 2)


def _feature_cka(x: Tensor, y: Tensor, unbiased: bool, eps: float | None) -> Tensor:
    xc, yc = _center_features(x), _center_features(y)
    hsic = partial(_feature_hsic, unbiased=unbiased)
    xy = hsic(xc, yc, (xc.mT @ yc).square().sum())
    xx = hsic(xc, xc, (xc.mT @ xc).square().sum())
    yy = hsic(yc, yc, (yc.mT @ yc).square().sum())
    value = _cosine(xy, xx.clamp_min(0), yy.clamp_min(0))
    return torch.where(_varies(x, eps) & _varies(y, eps), value, torch.zeros_like(value))


def cka(x: Tensor, y: Tensor, unbiased: bool = False, eps: float | None = None) -> Tensor:
    """Linear CKA of ``x`` (n, ...) and ``y`` (n, ...); the Gram or feature form, whichever costs less."""
    with full_precision(x.device.type):
        x, y = as_samples(x), as_samples(y)
        _check_samples(x.shape[0], y.shape[0], unbiased)
        if _gram_form_is_cheaper(x.shape[0], x.shape[1], y.shape[1]):
            return cka_from_grams(_Gram.apply(x), _Gram.apply(y), unbiased, eps)
        return _feature_cka(x, y, unbiased, eps)


@dataclass(frozen=True)
class CKASummary:
    """What a frozen side keeps for CKA: its centred Gram matrix, or its features when narrower than the batch."""

    gram: Tensor | None = None  # H Y Y^T H, (n, n)
    features: Tensor | None = None  # Y, (n, d) with d < n


def cka_summary(y: Tensor) -> CKASummary:
    """The smaller of ``centered_gram(y)`` (n x n) and the flattened features (n x d), for ``cka_with_summary``."""
    samples = as_samples(y)
    if samples.shape[1] < samples.shape[0]:
        return CKASummary(features=samples)
    return CKASummary(gram=centered_gram(samples))


def cka_with_summary(x: Tensor, summary: CKASummary, unbiased: bool = False, eps: float | None = None) -> Tensor:
    """Linear CKA of activations ``x`` against a ``cka_summary`` of the other side."""
    if summary.gram is not None:
        return cka_with_gram(x, summary.gram, unbiased, eps)
    return cka(x, summary.features, unbiased, eps)


# ----------------------------------------------------------------------------------------------------- RSA

RSAVariant = Literal["original", "classic"]


def similarity_matrix(x: Tensor, variant: RSAVariant = "original") -> Tensor:
    """The n x n matrix RSA compares: what a frozen side's hook keeps.

    ``original``: cosine similarities of the samples (rows l2-normalised, not centred), as the original code.
    ``classic``: the correlation-distance RDM, 1 - Pearson correlation between samples' patterns.
    """
    with full_precision(x.device.type):
        x = as_samples(x)
        if variant == "classic":
            x = x - x.mean(1, keepdim=True)
        x = _unit(x, torch.linalg.vector_norm(x, dim=1, keepdim=True))
        rsm = _Gram.apply(x)
        return 1 - rsm if variant == "classic" else rsm


def _pearson(a: Tensor, b: Tensor) -> Tensor:
    a, b = a - a.mean(), b - b.mean()
    return _cosine((a * b).sum(), (a * a).sum(), (b * b).sum())


def rsa_with_matrix(x: Tensor, guide_matrix: Tensor, variant: RSAVariant = "original") -> Tensor:
    """RSA of activations ``x`` against a precomputed ``similarity_matrix`` of the other side.

    ``original``: Pearson correlation of the full matrices, diagonal included (the original code).
    ``classic``: Pearson correlation of the upper triangles without the diagonal (differentiable; the rank-based
    Spearman variant is not).
    """
    ours = similarity_matrix(x, variant)
    _check_samples(ours.shape[-1], guide_matrix.shape[-1])
    theirs = guide_matrix.to(ours.dtype)
    if variant == "classic":
        rows, cols = torch.triu_indices(*ours.shape, offset=1, device=ours.device)
        ours, theirs = ours[rows, cols], theirs[rows, cols]
    with full_precision(x.device.type):
        return _pearson(ours.flatten(), theirs.flatten())


def rsa(x: Tensor, y: Tensor, variant: RSAVariant = "original") -> Tensor:
    """Representational similarity analysis of ``x`` and ``y``; see ``rsa_with_matrix`` for the variants."""
    return rsa_with_matrix(x, similarity_matrix(y, variant), variant)


# ----------------------------------------------------------------------------------------------------- Procrustes, CCA

def _compact(xc: Tensor) -> Tensor:
    """Rows with the same Gram matrix but at most n columns: ``X_c Q``, Q an orthonormal basis of its row space.

    Exact for every measure invariant to rotations of the features (Procrustes, CCA, SVCCA), and so are the
    gradients with Q held constant: such a measure depends on X only through X X^T = X Q Q^T X^T.
    """
    n, d = xc.shape
    if d <= n:
        return xc
    basis = torch.linalg.qr(xc.detach().mT).Q  # (d, n)
    return xc @ basis


def procrustes(x: Tensor, y: Tensor) -> Tensor:
    """Orthogonal Procrustes similarity in [0, 1]: ``max_Q <X_c Q, Y_c> = ||X_c^T Y_c||_*`` for unit-norm, centred
    ``X_c`` and ``Y_c`` (the Procrustes distance is ``sqrt(2 - 2 * similarity)``)."""
    with full_precision(x.device.type):
        x, y = as_samples(x), as_samples(y)
        _check_samples(x.shape[0], y.shape[0])
        xc, yc = _compact(_center_features(x)), _compact(_center_features(y))
        return torch.linalg.svdvals(xc.mT @ yc).sum()


def _warn_if_degenerate(n: int, d: int, what: str) -> None:
    if d >= n - 1:  # centred samples span at most n - 1 dimensions
        warnings.warn(f"{what} with {d} features and only {n} samples (d >= n - 1): the canonical correlations are "
                      f"trivially 1; reduce the features (svcca) or use more samples", stacklevel=3)


def _orthonormal_basis(xc: Tensor) -> Tensor:
    return torch.linalg.qr(_compact(xc)).Q


def canonical_correlations(x: Tensor, y: Tensor) -> Tensor:
    """The canonical correlations of ``x`` and ``y`` (centred), largest first, in [0, 1]."""
    with full_precision(x.device.type):
        x, y = as_samples(x), as_samples(y)
        _check_samples(x.shape[0], y.shape[0])
        for side in (x, y):
            _warn_if_degenerate(*side.shape, "CCA")
        qx, qy = _orthonormal_basis(_center_features(x)), _orthonormal_basis(_center_features(y))
        return torch.linalg.svdvals(qx.mT @ qy).clamp(0, 1)


def cca(x: Tensor, y: Tensor, squared: bool = False) -> Tensor:
    """Mean canonical correlation (``squared``: mean squared, Kornblith et al.'s R^2_CCA)."""
    rho = canonical_correlations(x, y)
    return (rho * rho if squared else rho).mean()


def _top_directions(xc: Tensor, keep: float) -> Tensor:
    """``X_c`` projected on its fewest right singular vectors that explain ``keep`` of the variance.

    The subspace is held constant for the gradient (it flows through the projection, not the choice of subspace).
    """
    compact = _compact(xc)
    _, s, vh = torch.linalg.svd(compact.detach(), full_matrices=False)
    explained = torch.cumsum(s * s, 0) / (s * s).sum().clamp_min(torch.finfo(s.dtype).tiny)
    count = int(torch.searchsorted(explained, torch.tensor(keep, dtype=s.dtype, device=s.device)).item()) + 1
    return compact @ vh[:count].mT


def svcca(x: Tensor, y: Tensor, keep: float = 0.99) -> Tensor:
    """SVCCA (Raghu et al. 2017): mean canonical correlation of the top singular directions explaining ``keep``."""
    if not 0 < keep <= 1:
        raise UserError(f"svcca keep must be in (0, 1], got {keep}")
    with full_precision(x.device.type):
        x, y = as_samples(x), as_samples(y)
        _check_samples(x.shape[0], y.shape[0])
        return cca(_top_directions(_center_features(x), keep), _top_directions(_center_features(y), keep))


def pwcca(x: Tensor, y: Tensor) -> Tensor:
    """Projection-weighted CCA (Morcos et al. 2018): canonical correlations weighted by how much of ``x``'s neurons
    each canonical variate of ``x`` accounts for, ``sum_j |<h_i, x_j>|`` (centred neurons, orthonormal variates).
    Not symmetric: the weights come from ``x``."""
    with full_precision(x.device.type):
        x, y = as_samples(x), as_samples(y)
        _check_samples(x.shape[0], y.shape[0])
        for side in (x, y):
            _warn_if_degenerate(*side.shape, "PWCCA")
        xc, yc = _center_features(x), _center_features(y)
        qx, qy = _orthonormal_basis(xc), _orthonormal_basis(yc)
        u, rho, _ = torch.linalg.svd(qx.mT @ qy, full_matrices=False)
        variates = qx @ u  # (n, k), orthonormal columns
        weights = (variates.mT @ xc).abs().sum(1)
        return (weights * rho.clamp(0, 1)).sum() / weights.sum().clamp_min(torch.finfo(weights.dtype).tiny)


# ----------------------------------------------------------------------------------------------------- registry

@dataclass(frozen=True)
class Similarity:
    """A similarity measure a config can name.

    ``measure(x, y)`` compares two sets of activations. For a frozen side (the guide), ``summarize(y)`` is what its
    forward hook keeps (an n x n matrix where the measure allows it, so the activation can be dropped at once) and
    ``with_summary(x, summary)`` compares the other side with it.
    """

    name: str
    pair: Callable[[Tensor, Tensor], Tensor]
    summarize: Callable[[Tensor], Any] = as_samples
    against: Callable[[Tensor, Any], Tensor] | None = None  # (x, summary); None: ``pair`` on the samples
    min_samples: int = 2  # fewer samples than this give no estimate (one sample has no spread)

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        return self.pair(x, y)

    def with_summary(self, x: Tensor, summary: Any) -> Tensor:
        return (self.against or self.pair)(x, summary)


def _cka_measure(name: str, unbiased: bool) -> Similarity:
    return Similarity(name, partial(cka, unbiased=unbiased), cka_summary, partial(cka_with_summary, unbiased=unbiased),
                      min_samples=UNBIASED_MIN_SAMPLES if unbiased else 2)


def _rsa_measure(name: str, variant: RSAVariant) -> Similarity:
    return Similarity(name, partial(rsa, variant=variant), partial(similarity_matrix, variant=variant),
                      partial(rsa_with_matrix, variant=variant))


SIMILARITIES: dict[str, Similarity] = {
    "cka": _cka_measure("cka", unbiased=False),
    "cka_unbiased": _cka_measure("cka_unbiased", unbiased=True),
    "rsa": _rsa_measure("rsa", "original"),
    "rsa_classic": _rsa_measure("rsa_classic", "classic"),
    "procrustes": Similarity("procrustes", procrustes),
    "cca": Similarity("cca", cca),
    "cca_squared": Similarity("cca_squared", partial(cca, squared=True)),
    "svcca": Similarity("svcca", svcca),
    "pwcca": Similarity("pwcca", pwcca),
}


def get_similarity(name: str) -> Similarity:
    """The measure called ``name``; a UserError naming the nearest known names otherwise."""
    if name in SIMILARITIES:
        return SIMILARITIES[name]
    near = difflib.get_close_matches(name, SIMILARITIES, n=3) or sorted(SIMILARITIES)
    raise UserError(f"unknown similarity {name!r}; nearest: {', '.join(near)}")
