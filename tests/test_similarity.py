"""Similarity measures against textbook formulas (float64, explicit centring matrices) and their known properties."""

from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from instill.errors import UserError
from instill.compare.similarity import (SIMILARITIES, DegenerateActivations, NonFiniteActivations,
                                        canonical_correlations, cca, center_gram, centered_gram, cka, cka_from_grams,
                                        cka_summary, cka_with_gram, cka_with_summary, get_similarity, gram, procrustes,
                                        pwcca, rsa, rsa_with_matrix, similarity_matrix, svcca, symmetric_product)

SETTINGS = settings(max_examples=25, deadline=None)


def data(n: int, d: int, seed: int, dtype=torch.float64, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=dtype) + shift


def related(x: torch.Tensor, d: int, seed: int, noise: float = 0.5) -> torch.Tensor:
    """A second representation that depends on x (a random linear map, a ReLU, noise)."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(x.shape[1], d, generator=g, dtype=x.dtype)
    return (x @ mixing).relu() + noise * torch.randn(x.shape[0], d, generator=g, dtype=x.dtype)


def random_rotation(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64)).Q


# ----------------------------------------------------------------------------------------------------- textbook

def textbook_cka(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Kornblith et al.: HSIC = tr(H K H H L H), with the centring matrix H built explicitly."""
    n = x.shape[0]
    h = torch.eye(n, dtype=x.dtype) - torch.ones(n, n, dtype=x.dtype) / n
    k, l = h @ x @ x.T @ h, h @ y @ y.T @ h
    return (k * l).sum() / torch.sqrt((k * k).sum() * (l * l).sum())


def song_hsic(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """The unbiased HSIC estimator of Song et al. (2012), eq. 5, term by term."""
    n = k.shape[0]
    k, l = k - torch.diag(torch.diag(k)), l - torch.diag(torch.diag(l))
    one = torch.ones(n, 1, dtype=k.dtype)
    value = (torch.trace(k @ l) + (one.T @ k @ one) * (one.T @ l @ one) / ((n - 1) * (n - 2))
             - 2 / (n - 2) * (one.T @ k @ l @ one))
    return value.squeeze() / (n * (n - 3))


def textbook_unbiased_cka(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    k, l = x @ x.T, y @ y.T
    return song_hsic(k, l) / torch.sqrt(song_hsic(k, k) * song_hsic(l, l))


shapes = st.tuples(st.integers(5, 24), st.integers(1, 40), st.integers(1, 40), st.integers(0, 10_000))


@SETTINGS
@given(shapes)
def test_biased_cka_equals_the_textbook_formula_in_both_forms(shape):
    n, d_x, d_y, seed = shape
    x = data(n, d_x, seed, shift=3.0)
    y = related(x, d_y, seed + 1)
    expected = textbook_cka(x, y)
    torch.testing.assert_close(cka(x, y), expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(cka_with_gram(x, gram(y)), expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(cka_with_gram(x, centered_gram(y)), expected, rtol=1e-10, atol=1e-10)


@SETTINGS
@given(shapes)
def test_unbiased_cka_equals_song_et_al(shape):
    n, d_x, d_y, seed = shape
    x = data(n, d_x, seed, shift=-2.0)
    y = related(x, d_y, seed + 1)
    expected = textbook_unbiased_cka(x, y)
    torch.testing.assert_close(cka(x, y, unbiased=True), expected, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(cka_with_gram(x, centered_gram(y), unbiased=True), expected, rtol=1e-8, atol=1e-10)


def test_both_forms_are_used_and_agree():
    narrow, wide = data(64, 4, 0), data(64, 300, 1)
    for x, y in ((narrow, related(narrow, 5, 2)), (wide, related(wide, 200, 3))):
        for unbiased in (False, True):
            by_grams = cka_from_grams(x @ x.T, y @ y.T, unbiased)
            torch.testing.assert_close(cka(x, y, unbiased), by_grams, rtol=1e-10, atol=1e-12)


def test_a_stack_of_grams_gives_one_value_per_pair():
    xs = [data(10, 6, seed) for seed in range(3)]
    ys = [related(x, 4, seed + 10) for seed, x in enumerate(xs)]
    stacked = cka_from_grams(torch.stack([gram(x) for x in xs]), torch.stack([centered_gram(y) for y in ys]))
    torch.testing.assert_close(stacked, torch.stack([textbook_cka(x, y) for x, y in zip(xs, ys)]))


def test_cka_summary_keeps_the_smaller_of_gram_and_features():
    narrow, wide, x = data(30, 4, 0), data(30, 50, 1), data(30, 10, 2)
    assert cka_summary(narrow).gram is None and cka_summary(narrow).features.shape == (30, 4)
    assert cka_summary(wide).features is None and cka_summary(wide).gram.shape == (30, 30)
    for y in (narrow, wide):
        for unbiased in (False, True):
            torch.testing.assert_close(cka_with_summary(x, cka_summary(y), unbiased), cka(x, y, unbiased))



@pytest.mark.parametrize("offset", [0.0, 1000.0])  # post-ReLU maps as they come; a common offset that dominates
def test_cka_with_a_gram_summary_matches_float64_in_value_and_gradient(offset):
    # cka_with_summary's own path (one Function: the target's centred Gram, its checks, two dot products, one matmul
    # backward) in float32, against the textbook formula in float64 on the same float32 numbers
    base = data(64, 30, 0)
    x32 = (related(base, 300, 1) + offset).float().requires_grad_()
    y32 = (related(base, 200, 2) + offset).float()
    value = cka_with_summary(x32, cka_summary(y32))
    assert "CKAWithCentredGram" in type(value.grad_fn).__name__
    value.backward()
    x64 = x32.detach().double().requires_grad_()
    expected = textbook_cka(x64, y32.double())
    expected.backward()
    assert value.item() == pytest.approx(expected.item(), abs=2e-6)
    assert ((x32.grad.double() - x64.grad).norm() / x64.grad.norm()).item() < 1e-4
    if offset:  # in float32, K - row means - column means + mean loses the spread to rounding at this offset
        gram = x32.detach() @ x32.detach().T
        assert abs(cka_from_grams(gram, y32 @ y32.T).item() - expected.item()) > 1e-3


def test_cka_with_a_gram_summary_refuses_what_it_cannot_compare():
    y = cka_summary(data(30, 40, 1, torch.float32))
    bad = data(30, 40, 0, torch.float32)
    bad[3, 1] = float("nan")
    with pytest.raises(NonFiniteActivations, match=r"x holds NaN or inf \(1 of 1200 values\)"):
        cka_with_summary(bad, y)
    with pytest.raises(DegenerateActivations, match="x is constant over the 30 samples"):
        cka_with_summary(1e4 + 1e-6 * data(30, 40, 0, torch.float32), y)
    with pytest.raises(UserError, match="between 20 and 30 samples"):
        cka_with_summary(data(20, 40, 0, torch.float32), y)


@pytest.mark.parametrize("offset", [0.0, 1e5])  # in float64 the features are centred first from ~1e5 on
def test_centered_gram_and_its_gradient_match_the_centring_matrix(offset):
    x = data(12, 20, 0, shift=offset).requires_grad_()
    weights = data(12, 12, 1)  # not symmetric: the backward must symmetrise
    h = torch.eye(12, dtype=x.dtype) - 1 / 12
    centred = h @ (x - offset)
    expected = centred @ centred.T
    ours = centered_gram(x)
    torch.testing.assert_close(ours, expected, rtol=1e-9, atol=1e-9)
    (grad,) = torch.autograd.grad((ours * weights).sum(), x)
    (textbook,) = torch.autograd.grad((expected * weights).sum(), x)
    torch.testing.assert_close(grad, textbook, rtol=1e-9, atol=1e-9)

# ----------------------------------------------------------------------------------------------------- properties

@SETTINGS
@given(st.integers(6, 20), st.integers(2, 30), st.floats(1e-3, 1e3), st.booleans(), st.integers(0, 10_000))
def test_cka_invariances(n, d, scale, unbiased, seed):
    x = data(n, d, seed)
    y = related(x, d + 3, seed + 1)
    base = cka(x, y, unbiased)
    rotated = cka(x @ random_rotation(d, seed + 2), scale * y + 7.0, unbiased)
    torch.testing.assert_close(rotated, base, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(cka(x, 5 * x @ random_rotation(d, seed), unbiased), torch.tensor(1.0, dtype=x.dtype))


def test_unbiased_cka_removes_the_bias_of_wide_independent_features():
    # Murphy et al. (ICLR 2024 Re-Align workshop), on correcting biased CKA: biased CKA of independent 1024-wide
    # Gaussian maps at n = 256 is ~0.8
    x, y = data(256, 1024, 0, torch.float32), data(256, 1024, 1, torch.float32)
    biased, unbiased = cka(x, y).item(), cka(x, y, unbiased=True).item()
    assert 0.7 < biased < 0.9
    assert abs(unbiased) < 0.02


def test_values_stay_float32_under_bf16_autocast():
    layer = torch.nn.Linear(64, 96)
    x, y = data(32, 64, 0, torch.float32), data(32, 96, 1, torch.float32)
    reference = cka(layer(x), y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
        assert out.dtype == torch.bfloat16
        for value in (cka(out, y), cka(out, y, unbiased=True), cka_with_gram(out, centered_gram(y)), rsa(out, y)):
            assert value.dtype == torch.float32
        value = cka(out, y)
    assert abs(value.item() - reference.item()) < 2e-2  # the activations themselves were computed in bf16


def test_products_run_in_full_float32_whatever_the_matmul_precision():
    # "medium" lets float32 matmuls run in bf16 (AMX CPUs, GPUs): ~1e-3 relative error in a Gram matrix
    x, y = data(64, 512, 0, torch.float32, shift=1.0), data(64, 256, 1, torch.float32)
    expected_gram, expected_cka = gram(x.double()), cka(x.double(), y.double()).item()
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        ours_gram, ours_cka = gram(x), cka(x, y).item()
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(previous)
    assert ((ours_gram - expected_gram).norm() / expected_gram.norm()).item() < 1e-6
    assert abs(ours_cka - expected_cka) < 1e-6


# Every form of every measure, as (name, function of x and y); the CKA forms: Gram (d >= n), feature (d < n), a
# cached guide Gram, a guide summary; RSA: pair and cached matrix.
def _forms():
    forms = {name: measure for name in SIMILARITIES.names() for measure in [get_similarity(name)]}
    forms["cka_with_gram"] = lambda a, b: cka_with_gram(a, centered_gram(b))
    forms["cka_from_grams"] = lambda a, b: cka_from_grams(gram(a), gram(b))
    forms["rsa_summary"] = lambda a, b: get_similarity("rsa").with_summary(a, get_similarity("rsa").summarize(b))
    forms["cka_summary"] = lambda a, b: get_similarity("cka").with_summary(a, get_similarity("cka").summarize(b))
    return forms


FORMS = _forms()


@pytest.mark.parametrize("d", [3, 40])  # feature form, Gram form
@pytest.mark.parametrize("name", sorted(FORMS))
def test_a_constant_layer_is_an_error_in_every_measure(name, d):
    fn, y = FORMS[name], data(30, d, 1)
    constants = {"zeros": torch.zeros(30, d, dtype=torch.float64),
                 "same row": torch.ones(30, 1, dtype=torch.float64) * data(1, d, 2),
                 "offset far above spread": 1e4 + 1e-6 * data(30, d, 3)}
    for what, x in constants.items():
        for a, b in ((x, y), (y, x)):
            with pytest.raises(DegenerateActivations, match="constant"):
                fn(a.clone().requires_grad_(), b)


@pytest.mark.parametrize("d", [3, 40])
@pytest.mark.parametrize("name", sorted(FORMS))
def test_nan_or_inf_is_one_clear_error_in_every_measure(name, d):
    fn = FORMS[name]
    for bad in (float("nan"), float("inf"), -float("inf")):
        x, y = data(30, d, 0), data(30, d, 1)
        x[3, 1] = bad
        for a, b in ((x, y), (y, x)):
            with pytest.raises(NonFiniteActivations, match=r"holds NaN or inf \("):
                fn(a, b)


def test_a_nan_guide_matrix_is_the_same_error():
    x = data(30, 40, 0)
    for fn, matrix in ((cka_with_gram, centered_gram(data(30, 40, 1))), (rsa_with_matrix, similarity_matrix(x))):
        matrix[2, 2] = float("nan")
        with pytest.raises(NonFiniteActivations, match="guide"):
            fn(x, matrix)


@pytest.mark.parametrize("name", SIMILARITIES.names())
def test_every_measure_refuses_fewer_samples_than_it_needs(name):
    measure = get_similarity(name)
    d = 1 if "cca" in name else 2  # the CCA family needs n - 1 > rank
    for n in range(1, measure.min_samples):
        with pytest.raises(DegenerateActivations, match=f"at least {measure.min_samples} samples, got {n}"):
            measure(data(n, d, 0), data(n, d, 1))
    value = measure(data(measure.min_samples, d, 0), data(measure.min_samples, d, 1))
    assert torch.isfinite(value)
    # before: CKA of 2 samples was 1 whatever the activations
    assert measure.min_samples >= 3


def test_cka_of_features_with_a_large_common_offset_is_right_in_float32():
    # Before centring first: the Gram form in float32 gave 0.485 against 0.960 at offset 1000.
    x = data(64, 300, 0)
    y = related(x, 200, 1)
    exact = cka(x, y).item()
    for offset in (100.0, 300.0, 1000.0):
        x32, y32 = (x + offset).float(), (y + offset).float()
        assert cka(x32, y32).item() == pytest.approx(exact, abs=1e-5)
        assert cka_with_gram(x32, centered_gram(y32)).item() == pytest.approx(exact, abs=1e-5)
        assert cka(x32, y32, unbiased=True).item() == pytest.approx(cka(x, y, unbiased=True).item(), abs=1e-5)
        grads = []
        for a in (x.clone().requires_grad_(), x32.clone().requires_grad_()):
            cka_with_gram(a, centered_gram(y32 if a.dtype == torch.float32 else y)).backward()
            grads.append(a.grad.double())
        assert ((grads[1] - grads[0]).norm() / grads[0].norm()).item() < 1e-4


def test_mistakes_are_user_errors():
    with pytest.raises(UserError, match="at least 4 samples"):
        cka(data(3, 5, 0), data(3, 5, 1), unbiased=True)
    with pytest.raises(UserError, match="8 and 6 samples"):
        cka(data(8, 5, 0), data(6, 5, 1))
    with pytest.raises(UserError, match=r"unknown similarity 'cka_unbaised' \(did you mean 'cka_unbiased'\?\); "
                                        r"known: cca"):
        get_similarity("cka_unbaised")


def test_the_old_name_of_cca_r2_still_names_it():
    """Earlier versions called the mean squared canonical correlation ``cca_squared`` here: configs and run
    snapshots that use that name still run the same measure."""
    x, y = data(40, 5, 0), data(40, 5, 1)
    assert get_similarity("cca_squared") is get_similarity("cca_r2")
    assert torch.equal(get_similarity("cca_squared")(x, y), cca(x, y, squared=True))


# ----------------------------------------------------------------------------------------------------- gradients

@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("d", [3, 12])  # feature form, Gram form
def test_cka_gradients_match_finite_differences(unbiased, d):
    x = data(9, d, 0, shift=1.0).requires_grad_()
    y = related(x.detach(), 7, 1).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: cka(a, b, unbiased), (x, y))
    guide = centered_gram(y.detach())
    assert torch.autograd.gradcheck(lambda a: cka_with_gram(a, guide, unbiased), (x,))
    assert torch.autograd.gradgradcheck(lambda a: gram(a), (x,))


def test_gradient_equals_the_textbook_formulas_autograd_gradient():
    x = data(16, 40, 0, shift=0.5).requires_grad_()
    y = related(x.detach(), 30, 1)
    (ours,) = torch.autograd.grad(cka_with_gram(x, gram(y)), x)
    (textbook,) = torch.autograd.grad(textbook_cka(x, y), x)
    torch.testing.assert_close(ours, textbook, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", SIMILARITIES.names())
def test_every_measure_is_finite_differentiable_and_agrees_with_its_summary(name):
    measure = get_similarity(name)
    x = data(40, 6, 0, torch.float32).requires_grad_()
    y = related(x.detach(), 8, 1)
    value = measure(x, y)
    value.backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    torch.testing.assert_close(measure.with_summary(x, measure.summarize(y)), value)
    assert -1 - 1e-6 <= value.item() <= 1 + 1e-6


# ----------------------------------------------------------------------------------------------------- RSA

def test_rsa_variants_against_numpy():
    x = data(12, 7, 0).numpy()
    y = related(torch.from_numpy(x), 9, 1).numpy()

    def cosine_matrix(a):
        a = a / np.linalg.norm(a, axis=1, keepdims=True)
        return a @ a.T

    original = np.corrcoef(cosine_matrix(x).ravel(), cosine_matrix(y).ravel())[0, 1]
    upper = np.triu_indices(12, k=1)
    classic = np.corrcoef((1 - np.corrcoef(x))[upper], (1 - np.corrcoef(y))[upper])[0, 1]
    x_t, y_t = torch.from_numpy(x), torch.from_numpy(y)
    assert rsa(x_t, y_t).item() == pytest.approx(original, abs=1e-10)
    assert rsa(x_t, y_t, "classic").item() == pytest.approx(classic, abs=1e-10)


# ----------------------------------------------------------------------------------------------------- Procrustes, CCA

def textbook_canonical_correlations(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """sqrt of the eigenvalues of S_xx^-1 S_xy S_yy^-1 S_yx (Hotelling), largest first."""
    x, y = x - x.mean(0), y - y.mean(0)
    sxx, syy, sxy = x.T @ x, y.T @ y, x.T @ y
    m = np.linalg.solve(sxx, sxy) @ np.linalg.solve(syy, sxy.T)
    values = np.sort(np.clip(np.linalg.eigvals(m).real, 0, 1))[::-1]
    return np.sqrt(values[:min(x.shape[1], y.shape[1])])


def test_procrustes_equals_the_nuclear_norm_and_is_rotation_invariant():
    x = data(20, 6, 0, shift=2.0)
    y = related(x, 4, 1)
    xc, yc = x - x.mean(0), y - y.mean(0)
    expected = torch.linalg.svdvals(xc.T @ yc).sum() / (xc.norm() * yc.norm())
    torch.testing.assert_close(procrustes(x, y), expected)
    torch.testing.assert_close(procrustes(x, 3 * x @ random_rotation(6, 2) - 1), torch.tensor(1.0, dtype=x.dtype))
    wide = data(10, 50, 3)  # more features than samples: compacted to n columns, same value
    wide_y = related(wide, 30, 4)
    wc, wyc = wide - wide.mean(0), wide_y - wide_y.mean(0)
    expected_wide = torch.linalg.svdvals(wc.T @ wyc).sum() / (wc.norm() * wyc.norm())
    torch.testing.assert_close(procrustes(wide, wide_y), expected_wide)


def test_cca_family_against_textbook():
    x = data(60, 5, 0, shift=1.0)
    y = related(x, 7, 1, noise=2.0)
    expected = textbook_canonical_correlations(x.numpy(), y.numpy())
    np.testing.assert_allclose(canonical_correlations(x, y).numpy(), expected, atol=1e-8)
    assert cca(x, y).item() == pytest.approx(expected.mean(), abs=1e-8)
    assert cca(x, y, squared=True).item() == pytest.approx((expected ** 2).mean(), abs=1e-8)
    assert svcca(x, y, keep=1.0).item() == pytest.approx(expected.mean(), abs=1e-8)
    assert cca(x, 4 * x @ random_rotation(5, 3) + 2).item() == pytest.approx(1.0, abs=1e-8)
    assert pwcca(x, x @ random_rotation(5, 3)).item() == pytest.approx(1.0, abs=1e-8)


def test_pwcca_weights_by_projection_on_x():
    x = data(80, 4, 0)
    y = related(x, 6, 1, noise=1.5)
    xc = (x - x.mean(0)).numpy()
    rho = textbook_canonical_correlations(x.numpy(), y.numpy())
    qx = np.linalg.qr(xc)[0]
    yc = (y - y.mean(0)).numpy()
    u, s, _ = np.linalg.svd(qx.T @ np.linalg.qr(yc)[0])
    weights = np.abs((qx @ u).T @ xc).sum(1)
    assert pwcca(x, y).item() == pytest.approx((weights * rho).sum() / weights.sum(), abs=1e-8)


def test_cca_refuses_a_side_whose_rank_reaches_the_sample_count_and_warns_of_trivial_correlations():
    with pytest.raises(DegenerateActivations, match="x has rank 9 with only 10 samples"):
        cca(data(10, 12, 0), data(10, 3, 1))  # every canonical correlation would be 1 whatever y
    with pytest.warns(UserWarning, match="2 canonical correlations are trivially 1"):
        cca(data(10, 5, 0), data(10, 6, 1))  # ranks 5 + 6 in n - 1 = 9 dimensions
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        svcca(data(40, 100, 0), data(40, 5, 1), keep=0.5)  # reduced below n: no warning
        cca(torch.cat([data(10, 4, 0)] * 3, 1), data(10, 3, 1))  # 12 columns of rank 4: no warning either


def issue_example(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """x 200 x 20 and y = x W + noise (issue 11)."""
    g = np.random.default_rng(seed)
    x = g.standard_normal((200, 20))
    return torch.tensor(x), torch.tensor(x @ g.standard_normal((20, 20)) + g.standard_normal((200, 20)))


def with_redundant_columns(x: torch.Tensor) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {"dead units": torch.cat([x, torch.zeros(len(x), 5, dtype=x.dtype)], 1),
            "duplicated columns": torch.cat([x, x[:, :3]], 1),
            "collinear columns": torch.cat([x, x[:, :3] @ torch.randn(3, 4, generator=g, dtype=x.dtype)], 1)}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cca_family_ignores_dead_duplicated_and_collinear_columns(dtype):
    # Before the rank-revealing basis (a plain QR adds arbitrary directions): CCA 0.8801 became 0.8842 / 0.8835 /
    # 0.8855 with these columns added, PWCCA 0.8914 became 0.8992 with dead units.
    x, y = issue_example()
    expected = textbook_canonical_correlations(x.numpy(), y.numpy())
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    xc = (x - x.mean(0)).numpy()
    for what, wider in with_redundant_columns(x).items():
        a, b = wider.to(dtype), y.to(dtype)
        np.testing.assert_allclose(canonical_correlations(a, b).double().numpy(), expected, atol=tol, err_msg=what)
        assert cca(a, b).item() == pytest.approx(expected.mean(), abs=tol), what
        assert svcca(a, b, keep=1.0).item() == pytest.approx(expected.mean(), abs=tol), what
        # PWCCA weights each canonical variate (those of x: the span is the same) by the layer's own neurons
        wc = (wider - wider.mean(0)).numpy()
        qx, qy = np.linalg.qr(xc)[0], np.linalg.qr((y - y.mean(0)).numpy())[0]
        u, rho, _ = np.linalg.svd(qx.T @ qy)
        weights = np.abs((qx @ u).T @ wc).sum(1)
        assert pwcca(a, b).item() == pytest.approx((weights * rho).sum() / weights.sum(), abs=tol), what
    x_dead = with_redundant_columns(x)["dead units"]
    assert pwcca(x_dead, y).item() == pytest.approx(pwcca(x, y).item(), abs=1e-10)


def test_cca_agrees_with_cca_zoo_on_redundant_columns():
    linear = pytest.importorskip("cca_zoo.linear")
    x, y = issue_example()
    for what, wider in {"plain": x, **with_redundant_columns(x)}.items():
        za, zb = linear.CCA(n_components=20).fit_transform([wider.numpy(), y.numpy()])
        reference = np.mean([abs(np.corrcoef(za[:, i], zb[:, i])[0, 1]) for i in range(20)])
        assert cca(wider, y).item() == pytest.approx(reference, abs=1e-8), what


def test_center_gram_matches_the_centring_matrix_and_is_idempotent():
    x = data(9, 4, 0, shift=5.0)
    h = torch.eye(9, dtype=x.dtype) - 1 / 9
    torch.testing.assert_close(center_gram(x @ x.T), h @ x @ x.T @ h)
    torch.testing.assert_close(center_gram(center_gram(x @ x.T)), h @ x @ x.T @ h)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_symmetric_product_is_the_matmul_within_rounding_and_exactly_symmetric(dtype):
    x = data(37, 300, 0, shift=1.0).to(dtype)
    exact = x.double() @ x.double().T
    for sample in (x, x[::2], x.T.contiguous().T):  # contiguous, strided rows, column-major
        k = symmetric_product(sample)
        assert k.dtype == dtype and k.is_contiguous() and torch.equal(k, k.T)
        reference = exact[::2, ::2] if sample.shape[0] != 37 else exact
        tolerance = 1e-4 if dtype == torch.float32 else 1e-12
        assert (k.double() - reference).abs().max() <= tolerance * reference.abs().max()
    assert torch.equal(symmetric_product(x.half()), x.half() @ x.half().T)  # no BLAS routine: the matmul


def test_the_symmetric_product_of_empty_or_single_samples_is_the_matmul_and_prints_nothing():
    for shape in [(5, 0), (0, 4), (1, 3), (3, 1)]:
        x = torch.randn(shape)
        torch.testing.assert_close(symmetric_product(x), x @ x.T)
    # the BLAS prints its complaint about a zero dimension through C's buffered stdout: only a process's exit shows it
    code = "import torch; from instill.compare.similarity import symmetric_product as p; p(torch.ones(5, 0)); " \
           "p(torch.ones(0, 4))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout == "" and "SYRK" not in done.stderr


def test_the_symmetric_product_runs_the_blas_at_torchs_thread_count_and_leaves_it_as_it_was(monkeypatch):
    from scipy.linalg import blas
    from threadpoolctl import threadpool_info, threadpool_limits

    def blas_threads() -> set[int]:
        return {pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"}

    seen, syrk = [], blas.ssyrk
    monkeypatch.setattr(blas, "ssyrk", lambda *args, **kwargs: (seen.append(blas_threads()), syrk(*args, **kwargs))[1])
    before = torch.get_num_threads()
    try:
        with threadpool_limits(3, user_api="blas"):  # a user's own setting for NumPy
            for threads in (1, 2):
                torch.set_num_threads(threads)
                symmetric_product(torch.randn(8, 16))
                assert seen[-1] == {threads} and blas_threads() == {3}
    finally:
        torch.set_num_threads(before)


# ----------------------------------------------------------------------------------------------------- bench

def test_bench_functions_run_at_toy_size():
    from bench import guidance as bench

    size = bench.Size(n=16, widths=(32, 600), repeats=2, warmup=1, square=64)
    result = bench.run_cka(size)
    assert [row["d"] for row in result["rows"]] == [32, 600]
    for row in result["rows"]:
        assert row["value_diff"] < 1e-5 and row["grad_rel_diff"] < 1e-3
        assert row["textbook_ms"] > 0 and row["ours_ms"] > 0 and row["matmul_fraction"] > 0
    assert result["targets_met"]["matmul_fraction"] is None  # no width >= 50176: not measured, not "met"
