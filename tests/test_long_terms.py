"""Structured terms over many levels (an ar1 over a long series): the latent
Hessian's blocks as batched matrix products and the Jacobian's values from the
design, against the per-row scatter and the JVP colouring they replace."""

import numpy as np
import pandas as pd
import pytest

import jax
import jax.numpy as jnp

import tmbx
from tmbx._hessian import LatentGaussianHessian
from tmbx.formula._design import build_design
from tmbx.formula._template import build_template, resolve_family


def _series(groups, times, seed=0, family="poisson"):
    rng = np.random.default_rng(seed)
    rows = []
    for g in range(groups):
        e = np.zeros(times)
        e[0] = rng.normal()
        for i in range(1, times):
            e[i] = 0.7 * e[i - 1] + np.sqrt(1 - 0.49) * rng.normal()
        for i in range(times):
            mu = 0.5 + 0.6 * e[i]
            y = rng.poisson(np.exp(mu)) if family == "poisson" else mu + 0.3 * rng.normal()
            rows.append((f"g{g}", i, y))
    df = pd.DataFrame(rows, columns=["g", "t", "y"])
    df["t"] = pd.Categorical(df["t"])
    return df


def _hessian(formula, df, family, ziformula=None):
    design = build_design(formula, df, ziformula=ziformula)
    fam = resolve_family(family, ziformula is not None)
    model = build_template(design, fam).model
    return model, model.laplace.hessian


CASES = {
    # one group: the dense layout, every row in its one block
    "dense": ("y ~ 1 + ar1(t + 0|g)", 1, 30, None),
    # eight groups: one head block of the arrow layout per group
    "arrow": ("y ~ 1 + ar1(t + 0|g)", 8, 12, None),
    # zero-inflation with its own random effects: two linear predictors a row (K = 2)
    "two_predictors": ("y ~ 1 + ar1(t + 0|g)", 2, 30, "~ (1|g)"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_block_products_equal_the_scatter(case, monkeypatch):
    formula, groups, times, zi = CASES[case]
    df = _series(groups, times, seed=3)
    model, h = _hessian(formula, df, "poisson", zi)
    assert h.blocks is not None and h.n_scattered == 0
    assert h.obs_slots.size == 0  # no (rows, R, R) table
    monkeypatch.setattr(LatentGaussianHessian, "BLOCK_MIN_R", 10**9)
    _, h_scatter = _hessian(formula, df, "poisson", zi)
    assert h_scatter.blocks is None
    rng = np.random.default_rng(1)
    x = jnp.asarray(model.par + 0.3 * rng.normal(size=model.par.size))
    u = jnp.asarray(0.5 * rng.normal(size=model.space.n_u))
    d = model.data
    np.testing.assert_allclose(np.asarray(h(x, u, d)), np.asarray(h_scatter(x, u, d)), rtol=1e-12, atol=1e-12)
    # and their derivatives (the log-determinant's gradient differentiates them)
    w = jnp.asarray(rng.normal(size=h.layout.size + 1))
    grads = [jax.grad(lambda xx, uu, fn=fn: jnp.dot(w, fn(xx, uu, d)), argnums=(0, 1))(x, u)
             for fn in (h, h_scatter)]
    for a, b in zip(*grads):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", sorted(CASES))
def test_jacobian_values_from_the_design_equal_the_jvp_colouring(case):
    formula, groups, times, zi = CASES[case]
    model, h = _hessian(formula, _series(groups, times, seed=4), "poisson", zi)
    rng = np.random.default_rng(2)
    x = jnp.asarray(model.par + 0.3 * rng.normal(size=model.par.size))
    u = jnp.asarray(rng.normal(size=model.space.n_u))
    assert h.jseeds is None  # (the colouring's arrays are not built)
    np.testing.assert_allclose(np.asarray(h.jacobian_values(x, u, model.data)),
                               np.asarray(h.colored_jacobian_values(x, u, model.data)), rtol=1e-12, atol=1e-12)


def test_reml_jacobian_values_from_the_design_equal_the_jvp_colouring():
    """REML integrates the fixed effects: their columns of X join the Jacobian."""
    df = _series(4, 9, seed=5, family="gaussian").assign(x=lambda f: np.arange(len(f)) % 5 - 2.0)
    design = build_design("y ~ x + ar1(t + 0|g)", df)
    model = build_template(design, resolve_family("gaussian", False), reml=True).model
    h = model.laplace.hessian
    x = jnp.asarray(model.par + 0.1)
    u = jnp.asarray(np.random.default_rng(0).normal(size=model.space.n_u))
    np.testing.assert_allclose(np.asarray(h.jacobian_values(x, u, model.data)),
                               np.asarray(h.colored_jacobian_values(x, u, model.data)), rtol=1e-12, atol=1e-12)


def test_gaussian_ar1_by_the_general_engine_equals_least_squares():
    """The Laplace approximation is exact for a Gaussian model: the general engine
    (block products over 25 time points a group) and profiled least squares, two
    different computations, reach the same optimum."""
    df = _series(5, 25, seed=6, family="gaussian")
    a = tmbx.glmm("y ~ 1 + ar1(t + 0|g)", data=df)
    b = tmbx.glmm("y ~ 1 + ar1(t + 0|g)", data=df, method="laplace")
    assert b.model.laplace.hessian.blocks is not None
    assert abs(a.loglik - b.loglik) < 1e-7
    np.testing.assert_allclose(b._fit.x, a._fit.x, rtol=1e-4, atol=1e-5)
