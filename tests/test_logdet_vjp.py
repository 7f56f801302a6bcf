"""The log-determinant's derivative rule (`tmbx._sparse.logdet`): selected inverses.

For every layout kind, on random symmetric positive-definite matrices with the
layout's own pattern, the rule's first derivative must match central finite
differences of ``log det`` (and the closed form ``tr(H^-1 dH)``), and its
second derivative (forward mode through the Takahashi recursion) must match
finite differences of the first and the closed form ``-tr(H^-1 dA H^-1 dB)``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tmbx  # noqa: F401  (float64)
from tmbx._sparse import DenseLayout, arrow_layout, banded_layout


def _spd_with_pattern(rng, pattern):
    """Random SPD matrix with (a subset of) the given symmetric 0/1 pattern."""
    n = pattern.shape[0]
    A = np.where(pattern, rng.uniform(-1, 1, (n, n)), 0.0)
    A = 0.5 * (A + A.T)
    A[np.diag_indices(n)] = np.abs(A).sum(axis=1) + rng.uniform(0.5, 1.5, n)  # diagonally dominant
    return A


def _lattice_pattern(k):
    i, j = np.meshgrid(np.arange(k), np.arange(k), indexing="ij")
    i, j = i.ravel(), j.ravel()
    return (np.abs(i[:, None] - i[None, :]) <= 1) & (np.abs(j[:, None] - j[None, :]) <= 1)


def _arrow_pattern(rng, m, k, t):
    """m head blocks of size k, each coupled to a few of t tail entries."""
    n = m * k + t
    P = np.zeros((n, n), bool)
    for b in range(m):
        sl = slice(b * k, (b + 1) * k)
        P[sl, sl] = True
        tails = m * k + rng.choice(t, size=rng.integers(1, t + 1), replace=False)
        P[sl, tails] = True
        P[tails, sl] = True
    P[m * k:, m * k:] = True
    return P, np.arange(m * k, n)


def _case(kind, rng):
    if kind == "dense":
        P = np.ones((7, 7), bool)
        A = _spd_with_pattern(rng, P)
        return A, DenseLayout(n=7)
    if kind == "banded":
        A = _spd_with_pattern(rng, _lattice_pattern(5))
        r, c = np.nonzero(A)
        return A, banded_layout(A.shape[0], r, c)
    k = 2 if kind == "arrow_k2" else 1
    P, tail = _arrow_pattern(rng, 6, k, 4)
    A = _spd_with_pattern(rng, P)
    r, c = np.nonzero(A)
    return A, arrow_layout(A.shape[0], r, c, tail)


def _store(layout, A, r, c):
    """Flat storage of A (entries stored once are read from the lower triangle)."""
    sl = layout.slots(r, c)
    keep = sl >= 0
    return jnp.asarray(layout.padding()).at[sl[keep]].add(A[r[keep], c[keep]]), sl, keep


def _stored_case(kind, rng):
    """A random SPD matrix of the layout kind, its pattern (r, c) and its storage."""
    A, lay = _case(kind, rng)
    r, c = np.nonzero(A)
    flat, sl, keep = _store(lay, A, r, c)
    return A, lay, r, c, flat, sl, keep


KINDS = ["dense", "arrow_k1", "arrow_k2", "banded"]


@pytest.mark.parametrize("kind", KINDS)
def test_logdet_rule_matches_finite_differences(kind):
    rng = np.random.default_rng(1)
    A, lay, r, c, flat, sl, keep = _stored_case(kind, rng)
    F = lay.factor(flat)
    assert float(F.logdet()) == pytest.approx(np.linalg.slogdet(A)[1], abs=1e-12)
    Ainv = np.linalg.inv(A)
    g = np.asarray(F.logdet_grad())  # the rule's selected inverse, laid out like flat
    np.testing.assert_allclose(np.asarray(jax.grad(lambda v: lay.factor(v).logdet())(flat)), g, rtol=0, atol=0)
    ld = jax.jit(lambda v: lay.factor(v).logdet())
    # random directions in storage space (asymmetric too: the rule is a function of
    # the stored values, which the factorization symmetrizes)
    for _ in range(3):
        d = np.zeros(lay.size)
        d[sl[keep]] = rng.normal(size=keep.sum())
        h = 1e-5
        fd = (float(ld(flat + h * d)) - float(ld(flat - h * d))) / (2 * h)
        assert g @ d == pytest.approx(fd, rel=1e-7, abs=1e-9)
    # closed form for a symmetric perturbation of one pattern entry: tr(A^-1 dA)
    for e in rng.choice(len(r), size=4, replace=False):
        i, j = r[e], c[e]
        dA = np.zeros_like(A)
        dA[i, j] = dA[j, i] = 1.0
        tangent = jnp.zeros(lay.size).at[sl[keep]].add(dA[r[keep], c[keep]])
        assert float(g @ np.asarray(tangent)) == pytest.approx(np.trace(Ainv @ dA), abs=1e-12)


@pytest.mark.parametrize("kind", KINDS)
def test_logdet_rule_second_derivative(kind):
    """Hessian of log det along two symmetric directions: -tr(A^-1 dA A^-1 dB)."""
    rng = np.random.default_rng(2)
    A, lay, r, c, flat, sl, keep = _stored_case(kind, rng)
    Ainv = np.linalg.inv(A)

    def sym_direction():
        dA = np.where(A != 0, rng.normal(size=A.shape), 0.0)
        dA = dA + dA.T
        return dA, jnp.zeros(lay.size).at[sl[keep]].add(dA[r[keep], c[keep]])

    (dA, ta), (dB, tb) = sym_direction(), sym_direction()
    grad = jax.grad(lambda v: lay.factor(v).logdet())
    second = float(jnp.dot(jax.jvp(grad, (flat,), (ta,))[1], tb))
    assert second == pytest.approx(-np.trace(Ainv @ dA @ Ainv @ dB), rel=1e-10)
    h = 1e-5
    fd = float(jnp.dot(grad(flat + h * ta) - grad(flat - h * ta), tb)) / (2 * h)
    assert second == pytest.approx(fd, rel=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_selected_inverse_diagonal(kind):
    A, lay, _, _, flat, _, _ = _stored_case(kind, np.random.default_rng(3))
    np.testing.assert_allclose(np.asarray(lay.factor(flat).diag_inverse()), np.diag(np.linalg.inv(A)),
                               rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind", ["dense", "arrow_k1", "arrow_k2"])
def test_logdet_rule_with_recursive_dense_kernels(kind, monkeypatch):
    """Dense factors above `_dense.BLOCK` (large tails) are factored and inverted by
    recursive blocking (`tmbx._dense`): the same first and second derivatives,
    here forced on small matrices with blocks of 3."""
    from tmbx import _dense

    monkeypatch.setattr(_dense, "BLOCK", 3)
    test_logdet_rule_matches_finite_differences(kind)
    test_logdet_rule_second_derivative(kind)
    test_selected_inverse_diagonal(kind)  # the arrow's diag_inverse (LMM gradients) too


def test_recursive_dense_kernels_match_numpy_under_jit_vmap_and_grad(monkeypatch):
    from tmbx import _dense, _sparse

    rng = np.random.default_rng(5)
    A = np.stack([_spd_with_pattern(rng, np.ones((7, 7), bool)) for _ in range(3)])
    L = jnp.linalg.cholesky(jnp.asarray(A))
    lapack = jax.vmap(_sparse._chol_inverse)(L)  # below the block size: cho_solve
    monkeypatch.setattr(_dense, "BLOCK", 4)
    rec = jax.jit(jax.vmap(_sparse._chol_inverse))(L)
    np.testing.assert_allclose(np.asarray(rec), np.linalg.inv(A), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(np.asarray(rec), np.asarray(lapack), rtol=1e-12, atol=1e-14)
    Lr, M = jax.jit(jax.vmap(_dense.chol_with_inverse))(jnp.asarray(A))
    np.testing.assert_allclose(np.asarray(Lr), np.linalg.cholesky(A), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(np.asarray(M), np.linalg.inv(np.swapaxes(np.linalg.cholesky(A), 1, 2)),
                               rtol=1e-12, atol=1e-14)
    # not positive definite: NaN pivots (what `ok()` checks), never a silent factor
    bad = A[0] - 10 * np.eye(7)
    assert not np.all(np.isfinite(np.diagonal(np.asarray(_dense.chol_with_inverse(jnp.asarray(bad))[0]))))
    # reverse mode: d/dL of sum(W * S^-1) against central differences
    W = jnp.asarray(rng.normal(size=(7, 7)))
    f = lambda l: jnp.sum(W * _sparse._chol_inverse(l))
    g = np.asarray(jax.grad(f)(L[0]))
    D = np.tril(rng.normal(size=(7, 7)))
    h = 1e-6
    fd = (float(f(L[0] + h * D)) - float(f(L[0] - h * D))) / (2 * h)
    assert float(np.sum(g * D)) == pytest.approx(fd, rel=1e-7)


@pytest.mark.parametrize("method", ["auto", "laplace"])
def test_fits_with_the_recursive_dense_kernels_match_glmmtmb(method, monkeypatch):
    """Penicillin's crossed REML model (24 plates x 6 samples) with the recursive
    dense kernels forced on every dense factor (blocks of 2), through the LMM path
    and the general Laplace path:
    glmmTMB 1.1.5's logLik, intercept SE and sds (tests/data/cases/penicillin_crossed.json)."""
    import json
    import os

    from tmbx import _dense

    monkeypatch.setattr(_dense, "BLOCK", 2)
    ref = json.load(open(os.path.join(os.path.dirname(__file__), "data", "cases",
                                      "penicillin_crossed.json")))["glmmTMB"]
    fit = tmbx.glmm("diameter ~ 1 + (1|plate) + (1|sample)", data=tmbx.load_dataset("penicillin"),
                    REML=True, method=method)
    assert fit.loglik == pytest.approx(ref["logLik"], abs=1e-4)
    se = float(np.sqrt(fit.vcov()["cond"].iloc[0, 0]))
    assert se == pytest.approx(ref["se"]["cond"]["(Intercept)"], rel=1e-3)
    for vc in ref["varcorr"]:
        assert float(fit.varcorr[vc["group"]].sd.iloc[0]) == pytest.approx(vc["sd"], rel=1e-3)
