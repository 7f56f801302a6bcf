"""The linear-cost path (`tmbx._iterative`): conjugate gradients and stochastic
log-determinants on an arrow layout's tail, against dense linear algebra, the
exact path and glmmTMB."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sps

import tmbx
from tmbx._sparse import arrow_layout, choose_layout

HERE = os.path.dirname(os.path.abspath(__file__))


def crossed_hessian(na, nb, N, seed, prior=(1.0, 0.5), one_b_per_a=False):
    """``Z'WZ + diag`` of a crossed (or, with one_b_per_a, nested) design."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, na, N)
    b = a % nb if one_b_per_a else rng.integers(0, nb, N)
    Z = sps.hstack([sps.csr_matrix((np.ones(N), (np.arange(N), a)), shape=(N, na)),
                    sps.csr_matrix((np.ones(N), (np.arange(N), b)), shape=(N, nb))]).tocsr()
    w = rng.uniform(0.5, 2.0, N)
    H = (Z.T @ sps.diags(w) @ Z + sps.diags(np.r_[np.full(na, prior[0]), np.full(nb, prior[1])])).tocoo()
    return H, np.arange(na, na + nb)


def factors(H, tail, **opts):
    """Exact and iterative layouts of H, with jit-compiled ``op(name, *args)``."""
    n = H.shape[0]
    ex = arrow_layout(n, H.row, H.col, tail)
    it = choose_layout(n, H.row, H.col, force=("arrow", tail), solver=tmbx.IterativeOptions(**opts))
    assert it.iterative is not None and it.size < ex.size  # the tail stored on its pattern
    out = []
    for lay in (ex, it):
        flat = jnp.zeros(lay.size + 1).at[lay.slots(H.row, H.col)].add(H.data)[:-1]
        op = jax.jit(lambda f, name, *a, lay=lay: getattr(lay.factor(f), name)(*a), static_argnums=1)
        out.append((lay, flat, lambda name, *a, op=op, flat=flat: op(flat, name, *a)))
    return out


def test_solve_is_exact_and_logdet_close_on_a_crossed_hessian():
    H, tail = crossed_hessian(600, 120, 5000, seed=1)
    (_, _, Fe), (_, _, Fi) = factors(H, tail, probes=64)
    dense = H.toarray()
    b = np.random.default_rng(2).normal(size=(H.shape[0], 3))
    np.testing.assert_allclose(Fi("solve", b), np.linalg.solve(dense, b), rtol=0, atol=1e-9)
    np.testing.assert_allclose(Fi("solve", b[:, 0]), np.linalg.solve(dense, b[:, 0]), rtol=0, atol=1e-9)
    exact = np.linalg.slogdet(dense)[1]
    assert abs(float(Fe("_logdet")) - exact) < 1e-8
    # stochastic: the estimate's error falls as 1/sqrt(probes); with 64 probes on
    # this strongly coupled design (each level of b in ~40 rows) it is under 0.5
    # for log det H ~ 2300
    assert 1e-6 < abs(float(Fi("_logdet")) - exact) < 0.5


def test_heavy_levels_are_eliminated_exactly():
    """The `exact_probes` most coupled tail levels H are eliminated exactly: the
    iterations run on S' = S_LL - S_LH S_HH^-1 S_HL, and the control variate's
    tr(E^2) (E = diag(S')^-1/2 S' diag(S')^-1/2 - I) is exact; against dense algebra."""
    H, tail = crossed_hessian(600, 120, 5000, seed=1)
    (_, _, _), (li, fi, _) = factors(H, tail, probes=64, exact_probes=32)
    F = jax.jit(li.factor)(fi)
    dense = H.toarray()
    na = dense.shape[0] - len(tail)
    S = dense[na:, na:] - dense[na:, :na] @ np.linalg.solve(dense[:na, :na], dense[:na, na:])
    hv = li.heavy
    L = np.setdiff1d(np.arange(len(tail)), hv)
    assert len(hv) == 32
    Sr = S[np.ix_(L, L)] - S[np.ix_(L, hv)] @ np.linalg.solve(S[np.ix_(hv, hv)], S[np.ix_(hv, L)])
    np.testing.assert_allclose(np.asarray(F.d)[L], np.diag(Sr), rtol=1e-12)
    E = Sr / np.sqrt(np.outer(np.diag(Sr), np.diag(Sr))) - np.eye(len(L))
    np.testing.assert_allclose(float(F.trE2), np.sum(E**2), rtol=1e-10)
    v = np.zeros((len(tail), 2))
    v[L] = np.random.default_rng(0).normal(size=(len(L), 2))
    out = np.asarray(jax.jit(lambda f, v: li.factor(f)._Sr(v))(fi, v))
    np.testing.assert_allclose(out[L], Sr @ v[L], atol=1e-10)
    assert np.all(out[hv] == 0)


def test_logdet_is_unbiased_over_seeds():
    H, tail = crossed_hessian(600, 120, 5000, seed=3)
    exact = np.linalg.slogdet(H.toarray())[1]
    ests = [float(factors(H, tail, probes=16, seed=s)[1][2]("_logdet")) for s in range(10)]
    sem = np.std(ests, ddof=1) / np.sqrt(len(ests))
    assert sem > 0  # it is an estimate
    assert abs(np.mean(ests) - exact) < 4 * sem


def test_deflation_removes_the_near_null_directions_variance():
    """On a crossed design the scaled tail has a near-null direction (b's constant
    vector: Z_a 1 = Z_b 1), which dominates the Rademacher probes' variance;
    probing the deflation basis exactly removes it, and the estimate stays
    unbiased. Against dense algebra, over seeds."""
    H, tail = crossed_hessian(600, 120, 5000, seed=1)
    exact = np.linalg.slogdet(H.toarray())[1]
    plain, defl = [], []
    for seed in range(4):
        for out, k in ((plain, 0), (defl, 8)):
            _, (li, fi, Fi) = factors(H, tail, probes=16, deflate=k, seed=seed)
            out.append((float(Fi("_logdet")) - exact, float(Fi("logdet_mc_se"))))
    plain, defl = np.array(plain), np.array(defl)
    assert plain[:, 1].mean() > 0.1  # without deflation: tenths of a unit with 16 probes
    assert defl[:, 1].mean() < 0.01 and np.abs(defl[:, 0]).max() < 0.01
    # the reported error is the size of the error made
    assert np.sqrt(np.mean(defl[:, 0] ** 2)) < 4 * defl[:, 1].mean()
    # the basis: orthonormal, and its first Ritz vector the near-null one
    F = jax.jit(lambda f: li.factor(f).with_deflation())(fi)
    U, theta = np.asarray(F.U), np.asarray(F.theta)
    np.testing.assert_allclose(U.T @ U, np.eye(U.shape[1]), atol=1e-10)
    assert theta[0] < 0.5 * np.median(theta)  # an outlier below the bulk
    # Ritz pairs of the scaled tail M = d^-1/2 S' d^-1/2: the near-null one converged
    light = np.setdiff1d(np.arange(len(tail)), li.heavy)
    dense = H.toarray()
    na = dense.shape[0] - len(tail)
    S = dense[na:, na:] - dense[na:, :na] @ np.linalg.solve(dense[:na, :na], dense[:na, na:])
    hv = li.heavy
    Sr = S[np.ix_(light, light)] - S[np.ix_(light, hv)] @ np.linalg.solve(S[np.ix_(hv, hv)], S[np.ix_(hv, light)])
    dl = np.diag(Sr)
    M = Sr / np.sqrt(np.outer(dl, dl))
    lam = np.linalg.eigvalsh(M)
    assert abs(theta[0] - lam[0]) < 1e-6 * lam[0]
    # and the solves that use them as a coarse correction (deflated preconditioner) are exact
    b = np.random.default_rng(3).normal(size=(H.shape[0], 2))
    np.testing.assert_allclose(jax.jit(lambda F, b: F.solve(b))(F, b), np.linalg.solve(dense, b), atol=1e-9)


def test_small_tails_and_diagonal_schur_complements_are_exact():
    # a tail of at most `probes` levels is probed with its unit vectors: exact
    H, tail = crossed_hessian(300, 30, 2500, seed=9)
    (_, _, Fe), (_, _, Fi) = factors(H, tail, probes=64)
    assert abs(float(Fi("_logdet")) - float(Fe("_logdet"))) < 1e-8
    np.testing.assert_allclose(Fi("diag_inverse"), Fe("diag_inverse"), rtol=1e-8)
    # nested: every level of a couples to one level of b, so S = T - B'D^-1 B is
    # diagonal; the control variates make the estimate exact with 4 probes
    H, tail = crossed_hessian(1000, 100, 5000, seed=4, one_b_per_a=True)
    (_, _, Fe), (_, _, Fi) = factors(H, tail, probes=4)
    assert abs(float(Fi("_logdet")) - float(Fe("_logdet"))) < 1e-8
    np.testing.assert_allclose(Fi("diag_inverse"), np.diag(np.linalg.inv(H.toarray())), rtol=1e-9)


def test_logdet_gradient_estimate_matches_the_selected_inverse():
    H, tail = crossed_hessian(600, 120, 5000, seed=5)
    (le, fe, Fe), (li, fi, Fi) = factors(H, tail, probes=100)
    rng = np.random.default_rng(6)
    dH = rng.normal(size=H.data.size) * 0.1
    de = jnp.zeros(le.size + 1).at[le.slots(H.row, H.col)].add(dH)[:-1]
    di = jnp.zeros(li.size + 1).at[li.slots(H.row, H.col)].add(dH)[:-1]
    # tr(H^-1 dH) by the exact selected inverse and by the probe estimate, and the
    # custom derivative rule of `logdet` on the iterative layout
    exact = float(jnp.sum(Fe("logdet_grad") * de))
    est = float(jnp.sum(Fi("logdet_grad") * di))
    _, jvp = jax.jit(lambda f, d: jax.jvp(lambda g: li.factor(g).logdet(), (f,), (d,)))(fi, di)
    assert abs(est - exact) < 0.02 * np.sqrt(np.sum(dH**2))
    assert abs(float(jvp) - est) < 1e-10
    Sigma = np.linalg.inv(H.toarray())
    np.testing.assert_allclose(Fi("diag_inverse"), np.diag(Sigma), atol=0.02 * np.max(np.diag(Sigma)))


def crossed_bernoulli(seed=0, na=150, nb=25, N=3000):
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, na, N), rng.integers(0, nb, N)
    x = rng.normal(size=N)
    eta = -0.3 + 0.6 * x + 0.8 * rng.normal(size=na)[a] + 0.5 * rng.normal(size=nb)[b]
    y = (rng.uniform(size=N) < 1 / (1 + np.exp(-eta))).astype(float)
    return pd.DataFrame(dict(y=y, x=x, a=pd.Categorical(a), b=pd.Categorical(b)))


def assert_agrees(it, ex):
    """The issue's criterion: log-likelihood within 0.01, fixed effects within 0.05
    standard errors; and the random-effect sds within 2%."""
    assert it.converged, it.message
    assert abs(it.loglik - ex.loglik) < 0.01
    se = np.sqrt(np.diag(ex.vcov()["cond"].values))
    assert np.all(np.abs(it.fixef["cond"].values - ex.fixef["cond"].values) < 0.05 * se)
    for g in ("a", "b"):
        assert abs(it.varcorr[g].sd.iloc[0] / ex.varcorr[g].sd.iloc[0] - 1) < 0.02


def test_iterative_fit_agrees_with_the_exact_fit():
    df = crossed_bernoulli(na=300, nb=80)
    f = "y ~ x + (1|a) + (1|b)"
    ex = tmbx.glmm(f, df, family="binomial", solver="exact")
    # the default 64 probes < 80 levels of b: stochastic estimates (not unit probes)
    it = tmbx.glmm(f, df, family="binomial", solver="iterative")
    assert it.template.model.laplace.layout.iterative is not None
    assert ex.template.model.laplace.layout.iterative is None
    assert_agrees(it, ex)


def test_iterative_lmm_matches_glmmtmb_on_penicillin():
    case = json.load(open(os.path.join(HERE, "data", "cases", "penicillin_crossed.json")))
    ref = case["glmmTMB"]
    fit = tmbx.glmm(case["python_formula"], tmbx.load_dataset("penicillin"), reml=True, solver="iterative")
    assert fit.converged, fit.message
    assert abs(fit.loglik - ref["logLik"]) < 0.01
    se = ref["se"]["cond"]["(Intercept)"]
    assert abs(fit.fixef["cond"]["Intercept"] - ref["fixef"]["cond"]["(Intercept)"]) < 0.05 * se
    for v in ref["varcorr"]:
        assert abs(fit.varcorr[v["group"]].sd.iloc[0] / v["sd"] - 1) < 0.02


def test_auto_picks_the_exact_path_for_a_small_tail_and_the_iterative_one_for_a_huge_tail():
    H, tail = crossed_hessian(300, 40, 2500, seed=7)
    assert choose_layout(H.shape[0], H.row, H.col, force=("arrow", tail), solver="auto").iterative is None
    # 100,000 levels crossed with 30,000: the dense tail alone would hold 9e8
    # entries (7 GB) and cost 9e12 flops to factor
    rng = np.random.default_rng(8)
    na, nb, N = 100_000, 30_000, 400_000
    a, b = rng.integers(0, na, N), na + rng.integers(0, nb, N)
    rows = np.r_[a, b, a, b, np.arange(na + nb)]
    cols = np.r_[a, b, b, a, np.arange(na + nb)]
    key = np.unique(rows * (na + nb) + cols)
    lay = choose_layout(na + nb, key // (na + nb), key % (na + nb),
                        force=("arrow", np.arange(na, na + nb)), solver="auto")
    assert lay.iterative is not None and lay.size < 5 * N  # linear in the rows, not nb^2


def test_bad_solver_arguments_are_explained():
    df = crossed_bernoulli(N=400)
    with pytest.raises(ValueError, match="solver must be"):
        tmbx.glmm("y ~ x + (1|a) + (1|b)", df, family="binomial", solver="cholesky")
    # a banded (AR1-like) pattern has no arrow structure to iterate on
    n = 2000
    i = np.arange(n)
    rows, cols = np.r_[i, i[:-1], i[1:]], np.r_[i, i[1:], i[:-1]]
    with pytest.raises(ValueError, match="solver='iterative' needs"):
        choose_layout(n, rows, cols, force="banded", solver="iterative")


def test_monte_carlo_error_is_reported_and_warned_about():
    # 100 rows per level of a: strongly coupled levels of b
    df = crossed_bernoulli(na=40, nb=100, N=4000)
    f = "y ~ x + (1|a) + (1|b)"
    # 4 probes and no deflation: a poor estimate, which the fit says
    with pytest.warns(RuntimeWarning, match="Monte Carlo standard error"):
        few = tmbx.glmm(f, df, family="binomial",
                        solver=tmbx.IterativeOptions(probes=4, exact_probes=4, deflate=0))
    assert few.loglik_mc_se > 0.01
    ex = tmbx.glmm(f, df, family="binomial", solver="exact")
    assert ex.loglik_mc_se == 0.0
    # the error it reports is the size of the error it makes
    assert abs(few.loglik - ex.loglik) < 5 * few.loglik_mc_se


def test_iterative_profiled_lmm_agrees_with_the_exact_fit():
    # Gaussian: the profiled least-squares path, whose layout arrays (over 10,000
    # entries here) travel as data of the compiled program
    rng = np.random.default_rng(11)
    na, nb, N = 3000, 100, 12000
    a, b = rng.integers(0, na, N), rng.integers(0, nb, N)
    x = rng.normal(size=N)
    y = 1.0 + 0.5 * x + 0.7 * rng.normal(size=na)[a] + 0.4 * rng.normal(size=nb)[b] + rng.normal(size=N)
    df = pd.DataFrame(dict(y=y, x=x, a=pd.Categorical(a), b=pd.Categorical(b)))
    f = "y ~ x + (1|a) + (1|b)"
    ex = tmbx.glmm(f, df, solver="exact")
    it = tmbx.glmm(f, df, solver="iterative")
    assert it._fit._lmm.layout.iterative is not None and it._fit._lmm._traced_attrs
    assert_agrees(it, ex)
    assert abs(it.sigma / ex.sigma - 1) < 0.01
    assert "linear-cost path" in it.message and "linear-cost" not in ex.message
