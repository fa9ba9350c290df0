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
after the one O(n^2 d) product (see "Large common offsets" below), which on the CPU is a symmetric rank-k update
computing one triangle (``symmetric_product``: half a matmul's multiply-adds). ``gram`` has a hand-written
backward, one matmul ``(G + G^T) X`` where autograd does two. The O(n^2) part has an analytic backward too: both
centrings are orthogonal projections (self-adjoint, idempotent), so the gradient with respect to ``K`` is
``dCKA/dC(K)`` itself.
When the features are narrower than the batch, the feature form ``||Y_c^T X_c||^2 / (||X_c^T X_c|| ||Y_c^T Y_c||)``
costs less and is used instead. For a frozen side (the guide) compute ``centered_gram(y)`` once under ``no_grad``,
for instance in its forward hook, dropping the activation at once, and call ``cka_with_gram(x, guide_gram)``;
``cka_summary`` / ``cka_with_summary`` do the same but keep the features instead when they are narrower than the
batch (token-level rows: n x d is then smaller than n x n, and the feature form far cheaper). The summary also keeps
``1 / ||H L H||``, and biased CKA against it runs as one autograd Function (``_CKAWithCentredGram``): the target's
Gram matrix centred in place from the row sums its checks read, two dot products, and a backward of one n x n
temporary and one matmul. The guidance loss calls it at every step, where the general path's two dozen small
n x n operations and their Python cost 1.2-1.4 ms a pair beyond its products at n = 128, d = 2,624, and this one
0.2 ms (bench/guidance.py).

Inputs a measure cannot compare raise instead of giving a plausible number, the same way in every measure and
form: ``NonFiniteActivations`` for NaN or inf, ``DegenerateActivations`` for fewer samples than the measure needs
(``Similarity.min_samples``: 3, 4 for unbiased CKA; with 2 samples CKA, Procrustes, RSA and CCA are 1 whatever the
activations) and for a side constant over its samples. Constant means that the centred features hold at most
``eps`` of their energy (``||X_c||^2 <= eps ||X||^2``: features equal for every sample, or a mean so far above their
spread that the dtype keeps only rounding); by default ``eps`` is 8 machine epsilons of the computation's dtype
(1e-6 in float32). The CCA family also refuses a side whose numerical rank reaches n - 1 (every canonical
correlation is then 1). Both are ``UserError`` subclasses; each check costs one synchronisation per side.

Large common offsets. A Gram matrix of uncentred features holds numbers of the size of the offset squared, and
float32 then loses the spread to rounding (0.485 instead of 0.960 at an offset of 1000). The Gram form reads the
rounding error off the product (``||X||^2 / ||X_c||^2``, from its trace and sum) and, when it is too large, centres
the features first (O(n d)) and multiplies again: usual activations pay nothing (see ``_centred_gram``).

The other measures: RSA (the original's variant and the classic one), orthogonal Procrustes, and the CCA family
(mean CCA, its square ``cca_r2``, SVCCA, PWCCA). ``SIMILARITIES`` names them all for configs (``instill list
measures``).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Iterator, Literal, Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..errors import UserError
from ..registry import Registry

EPS_ULPS = 8  # default eps, in machine epsilons: a side whose centred features hold less energy is constant
TINY = 1e-15  # floor of a norm we divide by: far below real activations, and its square is a normal float32
# The fewest samples each measure needs. With two samples the centred rows are +-v: CKA, Procrustes, the original
# RSA and CCA are then 1 whatever the activations, and the classic RSA has a single distance to correlate.
MIN_SAMPLES = 3
UNBIASED_MIN_SAMPLES = 4  # HSIC_u divides by n (n - 3)


class NonFiniteActivations(UserError):
    """A similarity was given activations (or a Gram matrix) holding NaN or inf."""


class DegenerateActivations(UserError):
    """A similarity was given activations it cannot compare: constant over the samples, or too few samples."""


# ----------------------------------------------------------------------------------------------------- numerics

def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4 cannot ask per device: assume it is on
        return True


@contextlib.contextmanager
def full_precision(device_type: str) -> Iterator[None]:
    """Autocast off and float32 matmuls in full precision (no TF32 / bf16 passes) for the enclosed products."""
    previous = torch.get_float32_matmul_precision()
    if previous != "highest":
        torch.set_float32_matmul_precision("highest")
    try:
        # entering torch.autocast costs more than the small n x n operations it would enclose: only when it is on
        with torch.autocast(device_type, enabled=False) if _autocast_on(device_type) else contextlib.nullcontext():
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


def _check_samples(n_x: int, n_y: int, minimum: int = MIN_SAMPLES, what: str = "this similarity") -> None:
    """Both sides hold the same number of samples, at least ``minimum`` (the measure's ``Similarity.min_samples``)."""
    if n_x != n_y:
        raise UserError(f"similarity between {n_x} and {n_y} samples: both sides need the same batch "
                        f"(check the declared batch axis of both layers)")
    if n_x < minimum:
        raise DegenerateActivations(f"{what} needs at least {minimum} samples, got {n_x} (use a larger batch or drop "
                                    f"the last incomplete batch)")


def _raise_non_finite(t: Tensor, side: str) -> None:
    bad = int((~torch.isfinite(t)).sum())
    if bad == 0:  # finite values whose sums overflow
        raise NonFiniteActivations(f"similarity: {side} holds values too large for {t.dtype} (their sums overflow)")
    raise NonFiniteActivations(f"similarity: {side} holds NaN or inf ({bad} of {t.numel()} values)")


def _check_centred(x: Tensor, side: str, mean: Tensor, centred_energy: Tensor, eps: float | None) -> None:
    """Raise unless ``x`` (n, d) is finite and varies over its samples, from its column means and ``||X_c||^2``.

    Constant means that the centred features hold at most ``eps`` of the energy, ``||X_c||^2 <= eps ||X||^2``
    (features equal for every sample, or a mean so far above their spread that the dtype keeps only its rounding);
    ``||X||^2 = ||X_c||^2 + n ||mean||^2``. A NaN or inf in ``x`` makes its column mean non-finite, so the check
    reads no more than the means: one synchronisation, no pass over ``x`` unless something is wrong.
    """
    mean, centred_energy = mean.detach(), centred_energy.detach()
    energy = centred_energy + x.shape[0] * mean.square().sum()
    finite, varies = torch.stack([torch.isfinite(mean).all() & torch.isfinite(centred_energy),
                                  centred_energy > _eps(eps, x.dtype) * energy]).tolist()
    if not finite:
        _raise_non_finite(x, side)
    if not varies:
        raise DegenerateActivations(f"similarity: {side} is constant over the {x.shape[0]} samples (a collapsed or "
                                    f"dead layer); no similarity is defined for it")


def _checked_centred(x: Tensor, side: str, eps: float | None = None) -> Tensor:
    """``x`` (n, d) with its column means removed, after checking that it is finite and varies over the samples
    (see ``_check_centred``)."""
    mean = x.mean(0, keepdim=True)
    xc = x - mean
    _check_centred(x, side, mean, torch.linalg.vector_norm(xc.detach()).square(), eps)
    return xc


def _check_gram(k: Tensor, side: str, eps: float | None) -> None:
    """A Gram matrix (raw or centred; stacks allowed) is finite and its samples vary (trace of ``H K H``)."""
    n = k.shape[-1]
    energy = k.diagonal(dim1=-2, dim2=-1).sum(-1)  # ||X||^2
    varying = energy - k.sum((-2, -1)) / n  # ||X_c||^2 = trace(H K H)
    finite, varies = torch.stack([torch.isfinite(k).all(), (varying > _eps(eps, k.dtype) * energy).all()]).tolist()
    if not finite:
        _raise_non_finite(k, side)
    if not varies:
        raise DegenerateActivations(f"similarity: the Gram matrix {side} is of samples that are constant (a "
                                    f"collapsed or dead layer); no similarity is defined for it")


def _unit(a: Tensor, norm: Tensor) -> Tensor:
    """``a / norm``, where ``norm`` is a norm of ``a``: an all-zero ``a`` stays zero, with a finite gradient."""
    return a / norm.clamp_min(TINY)


def _inverse_norm(matrix: Tensor) -> Tensor:
    """``1 / ||M||_F`` from one dot product of its flat view; the floor keeps an all-zero matrix finite."""
    flat = matrix.reshape(-1)
    return torch.dot(flat, flat).clamp_min(TINY * TINY).rsqrt()


def _cosine(dot: Tensor, norm_sq_a: Tensor, norm_sq_b: Tensor) -> Tensor:
    # the floor sits under the square root so that its gradient stays finite at zero
    return dot / (norm_sq_a * norm_sq_b).clamp_min(TINY * TINY).sqrt()


# ----------------------------------------------------------------------------------------------------- Gram form

_SYRK = {torch.float32: "ssyrk", torch.float64: "dsyrk"}
_blas_pools: Any = None  # threadpoolctl's controls of the BLAS libraries' thread pools, found at the first product


@contextlib.contextmanager
def _blas_at_torch_threads() -> Iterator[None]:
    """The BLAS libraries' thread pools at torch's thread count (a run's ``train.threads``) for the enclosed call,
    then as they were: unset, OpenBLAS takes every core beside torch's threads and a replay at another count could
    round differently; restored, a user's NumPy keeps its own setting. A pool already at the count is left alone
    (threadpoolctl's ``limit`` context, which reads every library's configuration, cost 5 % of a guided step)."""
    global _blas_pools
    if _blas_pools is None:
        from threadpoolctl import ThreadpoolController

        _blas_pools = ThreadpoolController().select(user_api="blas").lib_controllers
    threads = torch.get_num_threads()
    changed = [(pool, before) for pool in _blas_pools if (before := pool.get_num_threads()) != threads]
    for pool, _ in changed:
        pool.set_num_threads(threads)
    try:
        yield
    finally:
        for pool, before in changed:
            pool.set_num_threads(before)


def symmetric_product(x: Tensor) -> Tensor:
    """``X X^T`` (n x n) of a 2-D ``x`` (n, d), exactly symmetric.

    On the CPU, the BLAS symmetric rank-k update (``?syrk``, through scipy) computes one triangle: half the
    multiply-adds of the matmul ``x @ x.mT``, and about half its time on one thread (at 256 x 16,384 float32: 14.4
    against 29.2 ms; bench/compare.py); the other triangle is its mirror image. Elsewhere (a GPU, other dtypes) it
    is the matmul. Not differentiable by itself (``gram`` is).
    """
    if x.device.type != "cpu" or x.dtype not in _SYRK or x.dim() != 2 or x.numel() == 0:
        return x @ x.mT  # (an empty x: the BLAS would print an error for its zero dimension)
    from scipy.linalg import blas  # before the pools are looked up: it loads its BLAS

    # x (n, d) row-major is x^T column-major: syrk's trans=1 form gives (x^T)^T x^T = x x^T with no copy of x
    with _blas_at_torch_threads():
        upper = getattr(blas, _SYRK[x.dtype])(1.0, x.detach().contiguous().numpy().T, trans=1)
    k = torch.from_numpy(upper)  # column-major: its transpose view is row-major
    k += k.mT.tril(-1)  # the lower triangle (zeros) becomes the mirror of the upper one
    return k.mT


class _Gram(torch.autograd.Function):
    """``X X^T`` whose backward is one matmul ``(G + G^T) X`` instead of autograd's ``G X + G^T X``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        ctx.save_for_backward(x)
        with full_precision(x.device.type):
            return symmetric_product(x)

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


PRECISE_GRAM = 1e-6  # largest relative rounding error accepted in a Gram matrix centred after the product


def _centred_gram(x: Tensor, side: str, eps: float | None) -> tuple[Tensor, Tensor]:
    """``(H K H, F)``: the centred Gram matrix of samples ``x`` (n, d), correct in float32 whatever the features'
    common offset, and the features ``F`` it is the product of (``K = F F^T``): ``x``, or ``x`` centred when the
    offset dominates. Outside autograd: the callers' backward is ``(G + G^T) F`` with ``G`` the gradient of ``K``.

    Centring the Gram matrix after the product subtracts numbers of the size of the offset squared: its rounding
    error relative to ``H K H`` is about the machine epsilon times ``||X||^2 / ||X_c||^2`` (0.485 instead of 0.960
    at an offset of 1000 in float32). Both norms are read off ``K`` (its trace, and the trace minus its sum / n). When
    that error exceeds ``PRECISE_GRAM`` the features are centred first (O(n d)) and the product taken again; usual
    activations (post-ReLU maps have ``||X||^2 / ||X_c||^2`` of 1.5 to 3) keep the one product and no extra pass.
    On the centred path the mean is held constant for the gradient, which is exact: the centring projects any
    gradient onto centred matrices ``G`` (``1^T G = 0``), so the Gram's gradient ``(G + G^T) X_c`` already has the
    zero column means that the mean's own backward would subtract.

    The row sums serve both the check (the total ``1^T K 1``) and the centring (``K - r/n - r^T/n + total/n^2``):
    three in-place passes over ``K`` and one synchronisation (a check, a product and a separate centring made some
    ten n x n temporaries).

    Raises:
        NonFiniteActivations: ``x`` holds NaN or inf.
        DegenerateActivations: ``x`` is constant over its samples.
    """
    n = x.shape[0]
    features, k = x, symmetric_product(x)
    rows = k.sum(1)
    energy, total = torch.stack((k.diagonal().sum(), rows.sum())).tolist()
    if not (math.isfinite(energy) and math.isfinite(total)):
        _raise_non_finite(x, side)
    if not energy * torch.finfo(x.dtype).eps < PRECISE_GRAM * (energy - total / n):  # the offset dominates
        mean = x.mean(0, keepdim=True)
        features = x - mean
        k = symmetric_product(features)
        _check_centred(x, side, mean, k.diagonal().sum(), eps)
        rows = k.sum(1)
        total = rows.sum()
    row_means = rows.div_(n)
    return k.sub_(row_means[:, None]).sub_(row_means).add_(total / (n * n)), features


class _CentredGram(torch.autograd.Function):
    """``H X X^T H`` of samples ``x`` (n, d), checked (``_centred_gram``; ``side`` names ``x`` in its errors);
    backward ``H (G + G^T) H F``, which is ``H (G + G^T) X_c``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, side: str, eps: float | None) -> Tensor:
        with full_precision(x.device.type):
            kc, features = _centred_gram(x, side, eps)
        ctx.save_for_backward(features)
        return kc

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        (features,) = ctx.saved_tensors
        with full_precision(features.device.type):
            return center_gram(grad + grad.mT) @ features, None, None


def centered_gram(x: Tensor, eps: float | None = None) -> Tensor:
    """``H X X^T H``: what a frozen side's hook keeps (n x n) instead of its activation, for ``cka_with_gram``.

    Raises:
        NonFiniteActivations: ``x`` holds NaN or inf.
        DegenerateActivations: ``x`` is constant over its samples (see ``_checked_centred``).
    """
    return _CentredGram.apply(as_samples(x), "x", eps)


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


class _CenteredCosine(torch.autograd.Function):
    """CKA of Gram matrices ``(..., n, n)``: centre both, take the cosine; the backward in closed form.

    With ``a = C(K)``, ``b = C(L)`` and ``cka = <a, b> / (|a| |b|)``: ``dcka/dK = (b / |b| - cka a / |a|) / |a|``
    (``C`` is an orthogonal projection and both terms lie in its range). The callers have checked that neither
    side is constant; the norms' floor only keeps a U-centred matrix that happens to vanish finite.
    """

    @staticmethod
    def forward(ctx: Any, k: Tensor, l: Tensor, unbiased: bool) -> Tensor:
        centre = _u_center if unbiased else (lambda m: m)
        a, b = centre(center_gram(k)), centre(center_gram(l))
        inv_a = 1 / torch.linalg.vector_norm(a, dim=(-2, -1)).clamp_min(TINY)
        inv_b = 1 / torch.linalg.vector_norm(b, dim=(-2, -1)).clamp_min(TINY)
        cka = (a * b).sum((-2, -1)) * inv_a * inv_b
        ctx.save_for_backward(a, b, inv_a, inv_b, cka)
        return cka

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        a, b, inv_a, inv_b, cka = ctx.saved_tensors
        grad, inv_a, inv_b, cka = (t[..., None, None] for t in (grad, inv_a, inv_b, cka))
        grad_k = grad * inv_a * (b * inv_b - cka * a * inv_a) if ctx.needs_input_grad[0] else None
        grad_l = grad * inv_b * (a * inv_a - cka * b * inv_b) if ctx.needs_input_grad[1] else None
        return grad_k, grad_l, None


def _cka_min_samples(unbiased: bool) -> int:
    return UNBIASED_MIN_SAMPLES if unbiased else MIN_SAMPLES


def _cosine_of_grams(k: Tensor, l: Tensor, unbiased: bool) -> Tensor:
    _check_samples(k.shape[-1], l.shape[-1], _cka_min_samples(unbiased), "unbiased CKA" if unbiased else "CKA")
    dtype = torch.promote_types(torch.promote_types(k.dtype, l.dtype), torch.float32)
    with full_precision(k.device.type):
        return _CenteredCosine.apply(k.to(dtype), l.to(dtype), unbiased)


def cka_from_grams(k: Tensor, l: Tensor, unbiased: bool = False, eps: float | None = None) -> Tensor:
    """Linear CKA of two Gram matrices, raw or doubly centred (``(..., n, n)``: a stack gives one value per pair).

    Raises:
        NonFiniteActivations: a Gram matrix holds NaN or inf.
        DegenerateActivations: fewer samples than CKA needs, or a raw Gram matrix of constant samples (a centred
            one has lost its offset and cannot tell: ``centered_gram`` checks the features it is made of).
    """
    _check_gram(k, "k", eps)
    _check_gram(l, "l", eps)
    return _cosine_of_grams(k, l, unbiased)


def cka_with_gram(x: Tensor, guide_gram: Tensor, unbiased: bool = False, eps: float | None = None) -> Tensor:
    """Linear CKA of activations ``x`` against a cached Gram matrix of the other side (raw or ``centered_gram``).

    Raises:
        NonFiniteActivations, DegenerateActivations: as ``cka`` and ``cka_from_grams``.
    """
    _check_gram(guide_gram, "guide_gram", eps)
    return _cka_with_checked_gram(x, guide_gram, unbiased, eps)


def _cka_with_checked_gram(x: Tensor, guide_gram: Tensor, unbiased: bool, eps: float | None) -> Tensor:
    with full_precision(x.device.type):
        return _cosine_of_grams(_CentredGram.apply(as_samples(x), "x", eps), guide_gram, unbiased)


# ----------------------------------------------------------------------------------------------------- CKA

def _gram_form_is_cheaper(n: int, d_x: int, d_y: int) -> bool:
    # multiply-adds: Gram form n^2 (d_x + d_y); feature form n (d_x d_y + d_x^2 + d_y^2)
    return n * (d_x + d_y) <= d_x * d_y + d_x * d_x + d_y * d_y


def _center_features(x: Tensor, side: str = "x", eps: float | None = None) -> Tensor:
    """Checked, centred columns scaled to unit Frobenius norm (CKA and the other measures are scale-invariant)."""
    xc = _checked_centred(x, side, eps)
    return _unit(xc, torch.linalg.vector_norm(xc))


def _feature_hsic(xc: Tensor, yc: Tensor, cross: Tensor, unbiased: bool) -> Tensor:
    """HSIC(X, Y) * n(n-3) (unbiased) or * (n-1)^2 (biased) from centred features and ``||X_c^T Y_c||^2``."""
    if not unbiased:
        return cross
    n = xc.shape[0]
    k, l = (xc * xc).sum(1), (yc * yc).sum(1)  # the Gram diagonals; centred rows sum to zero, so 1^T K 1 = 0
    return cross - k @ l + k.sum() * l.sum() / ((n - 1) * (n - 2)) - 2 * (k @ l) / (n - 2)


def _feature_cka(x: Tensor, y: Tensor, unbiased: bool, eps: float | None) -> Tensor:
    xc, yc = _center_features(x, "x", eps), _center_features(y, "y", eps)
    hsic = partial(_feature_hsic, unbiased=unbiased)
    xy = hsic(xc, yc, (xc.mT @ yc).square().sum())
    xx = hsic(xc, xc, (xc.mT @ xc).square().sum())
    yy = hsic(yc, yc, (yc.mT @ yc).square().sum())
    return _cosine(xy, xx.clamp_min(0), yy.clamp_min(0))


def cka(x: Tensor, y: Tensor, unbiased: bool = False, eps: float | None = None) -> Tensor:
    """Linear CKA of ``x`` (n, ...) and ``y`` (n, ...); the Gram or feature form, whichever costs less.

    Raises:
        NonFiniteActivations: either side holds NaN or inf.
        DegenerateActivations: fewer than 3 samples (4 unbiased), or a side constant over its samples.
    """
    with full_precision(x.device.type):
        x, y = as_samples(x), as_samples(y)
        _check_samples(x.shape[0], y.shape[0], _cka_min_samples(unbiased), "unbiased CKA" if unbiased else "CKA")
        if _gram_form_is_cheaper(x.shape[0], x.shape[1], y.shape[1]):
            return _cosine_of_grams(_CentredGram.apply(x, "x", eps), _CentredGram.apply(y, "y", eps), unbiased)
        return _feature_cka(x, y, unbiased, eps)


@dataclass(frozen=True)
class CKASummary:
    """What a frozen side keeps for CKA: its centred Gram matrix, or its features when narrower than the batch;
    made (and checked) by ``cka_summary``."""

    gram: Tensor | None = None  # H Y Y^T H, (n, n)
    features: Tensor | None = None  # Y, (n, d) with d < n
    inv_norm: Tensor | None = None  # 1 / ||H Y Y^T H||, taken once here rather than at every comparison


def cka_summary(y: Tensor) -> CKASummary:
    """The smaller of ``centered_gram(y)`` (n x n) and the flattened features (n x d), for ``cka_with_summary``.

    Raises:
        NonFiniteActivations, DegenerateActivations: as ``centered_gram``.
    """
    samples = as_samples(y)
    if samples.shape[1] < samples.shape[0]:
        _checked_centred(samples, "y")  # raise here, in the guide's hook, as the Gram form does
        return CKASummary(features=samples)
    gram = centered_gram(samples)
    return CKASummary(gram=gram, inv_norm=_inverse_norm(gram.detach()))


class _CKAWithCentredGram(torch.autograd.Function):
    """Biased linear CKA of samples ``x`` (n, d) against the other side's centred Gram matrix ``L_c`` and its
    ``1 / ||L_c||``, in one pass: ``K_c = H X X^T H`` (``_centred_gram``: checked, centred in place), then
    ``cka = <K_c, L_c> / (||K_c|| ||L_c||)`` from two dot products; ``L_c`` is neither centred nor normed again.

    Backward: ``dcka/dK = (L_c / ||L_c|| - cka K_c / ||K_c||) / ||K_c||`` (as ``_CenteredCosine``), symmetric, so
    the Gram's ``(G + G^T) F`` is ``2 G F``: one n x n temporary and one matmul. ``L_c`` gets no gradient (a frozen
    side; ``cka_with_summary`` takes the general path for a summary that requires one).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, lc: Tensor, inv_b: Tensor, eps: float | None) -> Tensor:
        with full_precision(x.device.type):
            kc, features = _centred_gram(x, "x", eps)
            inv_a = _inverse_norm(kc)
            cka = torch.dot(kc.view(-1), lc.reshape(-1)) * inv_a * inv_b
        ctx.save_for_backward(features, kc, lc, inv_a * inv_b, cka * inv_a * inv_a)
        return cka

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        features, kc, lc, lc_scale, kc_scale = ctx.saved_tensors
        twice = grad * 2
        dk = torch.mul(lc, lc_scale * twice).addcmul_(kc, kc_scale * twice, value=-1)
        with full_precision(features.device.type):
            return dk @ features, None, None, None


def cka_with_summary(x: Tensor, summary: CKASummary, unbiased: bool = False, eps: float | None = None) -> Tensor:
    """Linear CKA of activations ``x`` against a ``cka_summary`` of the other side."""
    if summary.gram is None:
        return cka(x, summary.features, unbiased, eps)
    # checked when cka_summary made it: finite, of samples that vary
    if unbiased or summary.inv_norm is None or summary.gram.requires_grad:
        return _cka_with_checked_gram(x, summary.gram, unbiased, eps)
    x = as_samples(x)
    _check_samples(x.shape[0], summary.gram.shape[-1], MIN_SAMPLES, "CKA")
    dtype = torch.promote_types(x.dtype, summary.gram.dtype)
    return _CKAWithCentredGram.apply(x.to(dtype), summary.gram.to(dtype), summary.inv_norm.to(dtype), eps)


# ----------------------------------------------------------------------------------------------------- RSA

RSAVariant = Literal["original", "classic"]


def similarity_matrix(x: Tensor, variant: RSAVariant = "original") -> Tensor:
    """The n x n matrix RSA compares: what a frozen side's hook keeps.

    ``original``: cosine similarities of the samples (rows l2-normalised, not centred), as the original code.
    ``classic``: the correlation-distance RDM, 1 - Pearson correlation between samples' patterns.

    Raises:
        NonFiniteActivations: ``x`` holds NaN or inf.
        DegenerateActivations: fewer than 3 samples, or ``x`` constant over its samples.
    """
    with full_precision(x.device.type):
        x = as_samples(x)
        _check_samples(x.shape[0], x.shape[0], MIN_SAMPLES, "RSA")
        _checked_centred(x, "x")
        if variant == "classic":
            x = x - x.mean(1, keepdim=True)
        x = _unit(x, torch.linalg.vector_norm(x, dim=1, keepdim=True))
        rsm = _Gram.apply(x)
        return 1 - rsm if variant == "classic" else rsm


def pearson(a: Tensor, b: Tensor) -> Tensor:
    """Pearson correlation of two similarity matrices' entries; both must vary (and the guide's be finite)."""
    eps = _eps(None, a.dtype)
    ac, bc = a - a.mean(), b - b.mean()
    finite, a_varies, b_varies = torch.stack([
        torch.isfinite(b).all(), ac.detach().square().sum() > eps * a.detach().square().sum(),
        bc.square().sum() > eps * b.square().sum()]).tolist()
    if not finite:
        _raise_non_finite(b, "guide_matrix")
    if not (a_varies and b_varies):
        raise DegenerateActivations(f"similarity: the similarity matrix of {'x' if not a_varies else 'the guide'} is "
                                    f"constant (every pair of samples equally similar); RSA is not defined for it")
    return _cosine((ac * bc).sum(), (ac * ac).sum(), (bc * bc).sum())


def rsa_with_matrix(x: Tensor, guide_matrix: Tensor, variant: RSAVariant = "original") -> Tensor:
    """RSA of activations ``x`` against a precomputed ``similarity_matrix`` of the other side.

    ``original``: Pearson correlation of the full matrices, diagonal included (the original code).
    ``classic``: Pearson correlation of the upper triangles without the diagonal (differentiable; the rank-based
    Spearman variant is not).

    Raises:
        NonFiniteActivations: ``x`` or ``guide_matrix`` holds NaN or inf.
        DegenerateActivations: fewer than 3 samples, ``x`` constant, or either matrix constant.
    """
    _check_samples(as_samples(x).shape[0], guide_matrix.shape[-1], MIN_SAMPLES, "RSA")
    ours = similarity_matrix(x, variant)
    theirs = guide_matrix.to(ours.dtype)
    if variant == "classic":
        rows, cols = torch.triu_indices(*ours.shape, offset=1, device=ours.device)
        ours, theirs = ours[rows, cols], theirs[rows, cols]
    with full_precision(x.device.type):
        return pearson(ours.flatten(), theirs.flatten())


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
    ``X_c`` and ``Y_c`` (the Procrustes distance is ``sqrt(2 - 2 * similarity)``).

    Raises:
        NonFiniteActivations: either side holds NaN or inf.
        DegenerateActivations: fewer than 3 samples, or a side constant over its samples.
    """
    with full_precision(x.device.type):
        x, y = as_samples(x), as_samples(y)
        _check_samples(x.shape[0], y.shape[0], MIN_SAMPLES, "Procrustes")
        xc, yc = _compact(_center_features(x, "x")), _compact(_center_features(y, "y"))
        return torch.linalg.svdvals(xc.mT @ yc).sum()


def _orthonormal_basis(xc: Tensor) -> Tensor:
    """An orthonormal basis (n x r) of the column space of ``xc``, ``r`` its numerical rank.

    Rank-revealing: singular values below ``max(n, d) * machine epsilon`` of the largest count as zero (numpy's
    ``matrix_rank``), so dead units, duplicated and collinear columns add no direction (a plain QR of a
    rank-deficient matrix adds arbitrary ones). The gradient flows through ``X_c V_r`` with the right singular
    vectors ``V_r`` held constant, which spans the same space; a QR of that full-rank product is differentiable.
    """
    compact = _compact(xc)
    _, s, vh = torch.linalg.svd(compact.detach(), full_matrices=False)
    tolerance = s[0] * max(compact.shape) * torch.finfo(s.dtype).eps
    rank = int((s > tolerance).sum())
    return torch.linalg.qr(compact @ vh[:rank].mT).Q


def _cca_bases(x: Tensor, y: Tensor, what: str) -> tuple[Tensor, Tensor, Tensor]:
    """Unit centred ``x`` and the orthonormal bases of both sides, refusing inputs whose correlations are all 1.

    Centred samples span at most n - 1 dimensions: a side of rank n - 1 holds every direction, so every canonical
    correlation is 1 whatever the other side (and ``rank_x + rank_y - (n - 1)`` of them are 1 in any case).
    """
    x, y = as_samples(x), as_samples(y)
    n = x.shape[0]
    _check_samples(n, y.shape[0], MIN_SAMPLES, what)
    xc = _center_features(x, "x")
    qx, qy = _orthonormal_basis(xc), _orthonormal_basis(_center_features(y, "y"))
    for side, basis in (("x", qx), ("y", qy)):
        if basis.shape[1] >= n - 1:
            raise DegenerateActivations(f"{what}: {side} has rank {basis.shape[1]} with only {n} samples (centred "
                                        f"samples span n - 1 = {n - 1} dimensions), so every canonical correlation "
                                        f"is 1; reduce the features (svcca) or use more samples")
    trivial = qx.shape[1] + qy.shape[1] - (n - 1)
    if trivial > 0:
        warnings.warn(f"{what} of ranks {qx.shape[1]} and {qy.shape[1]} with only {n} samples: {trivial} canonical "
                      f"correlations are trivially 1; reduce the features (svcca) or use more samples", stacklevel=3)
    return xc, qx, qy


def canonical_correlations(x: Tensor, y: Tensor) -> Tensor:
    """The canonical correlations of ``x`` and ``y`` (centred), largest first, in [0, 1]: one per dimension of the
    smaller of the two spans (numerical ranks, so dead units and collinear columns change nothing).

    Raises:
        NonFiniteActivations: either side holds NaN or inf.
        DegenerateActivations: fewer than 3 samples, a side constant, or a side of rank n - 1 (all correlations 1).
    """
    with full_precision(x.device.type):
        _, qx, qy = _cca_bases(x, y, "CCA")
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
        _check_samples(x.shape[0], y.shape[0], MIN_SAMPLES, "SVCCA")
        return cca(_top_directions(_center_features(x, "x"), keep), _top_directions(_center_features(y, "y"), keep))


def pwcca(x: Tensor, y: Tensor) -> Tensor:
    """Projection-weighted CCA (Morcos et al. 2018): canonical correlations weighted by how much of ``x``'s neurons
    each canonical variate of ``x`` accounts for, ``sum_j |<h_i, x_j>|`` (centred neurons, orthonormal variates).
    Not symmetric: the weights come from ``x``."""
    with full_precision(x.device.type):
        xc, qx, qy = _cca_bases(x, y, "PWCCA")
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
    min_samples: int = MIN_SAMPLES  # fewer samples are refused (the CCA family also needs more than a side's rank)
    # Degenerate (trivially 1) unless n > d + 1 on both sides, or on ``x``'s: the compare stage checks it up front.
    needs_more_samples_than_features: Literal["none", "both", "a"] = "none"
    # Many layers at once (the compare stage): each layer's ``prepare(x)`` once, then ``prepared_pair`` per pair;
    # None: ``pair`` on the features, centred and rotated onto their row space (exact for rotation-invariant measures).
    prepare: Callable[[Tensor], Any] | None = None
    prepared_pair: Callable[[Any, Any], Tensor] | None = None

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        return self.pair(x, y)

    def with_summary(self, x: Tensor, summary: Any) -> Tensor:
        return (self.against or self.pair)(x, summary)

    @property
    def description(self) -> str:
        """The first sentence of the pair function's docstring (help text, plot titles)."""
        doc = getattr(self.pair, "func", self.pair).__doc__ or ""
        return " ".join(doc.strip().split("\n\n")[0].split()).replace("``", "")


# Each entry is a ``Similarity`` or a plain function ``measure(x, y) -> 0-d tensor`` (1 = most similar): a measure of
# your own is one decorated function (see docs/design.md, "Extending instill"), by import path ``pkg.mod:fn`` or an
# entry point of group ``instill.similarities`` as well. ``cca_squared`` is the name earlier versions gave ``cca_r2``
# here (the compare stage always called it ``cca_r2``); configs and run snapshots that use it still work.
SIMILARITIES = Registry("similarity", group="similarities", aliases={"cca_squared": "cca_r2"})


def _add(measure: Similarity) -> None:
    SIMILARITIES.register(measure.name, doc=measure.description)(measure)


def _cka_measure(name: str, unbiased: bool) -> Similarity:
    return Similarity(name, partial(cka, unbiased=unbiased), cka_summary, partial(cka_with_summary, unbiased=unbiased),
                      min_samples=_cka_min_samples(unbiased), prepare=lambda x: centered_gram(x.double()),
                      prepared_pair=partial(cka_from_grams, unbiased=unbiased))


def _rsa_entries(x: Tensor, variant: RSAVariant) -> Tensor:
    """The entries of ``x``'s similarity matrix that RSA correlates: all of them (the original), or those above the
    diagonal (``classic``)."""
    matrix = similarity_matrix(x.double(), variant)
    if variant == "original":
        return matrix.flatten()
    rows, cols = torch.triu_indices(*matrix.shape, offset=1, device=matrix.device)
    return matrix[rows, cols]


def _rsa_measure(name: str, variant: RSAVariant) -> Similarity:
    return Similarity(name, partial(rsa, variant=variant), partial(similarity_matrix, variant=variant),
                      partial(rsa_with_matrix, variant=variant), prepare=partial(_rsa_entries, variant=variant),
                      prepared_pair=pearson)


for _measure in (
    _cka_measure("cka", unbiased=False),
    _cka_measure("cka_unbiased", unbiased=True),
    _rsa_measure("rsa", "original"),
    _rsa_measure("rsa_classic", "classic"),
    Similarity("procrustes", procrustes),
    Similarity("cca", cca, needs_more_samples_than_features="both"),
    Similarity("cca_r2", partial(cca, squared=True), needs_more_samples_than_features="both"),
    Similarity("svcca", svcca, needs_more_samples_than_features="both"),
    Similarity("pwcca", pwcca, needs_more_samples_than_features="both"),
):
    _add(_measure)


def get_similarity(name: str, options: Optional[dict[str, Any]] = None) -> Similarity:
    """The measure called ``name`` (a registered one, an import path, an entry point) with its ``options`` (the
    keyword-only parameters of a measure function of your own; the shipped measures take none); a UserError
    otherwise."""
    entry = SIMILARITIES.get(name)
    measure = entry.build if isinstance(entry.build, Similarity) else Similarity(entry.name, entry.build)
    return SIMILARITIES.bound(name, measure, "pair", options)
