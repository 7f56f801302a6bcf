"""Checks of a template fit: TMB's ``checkConsistency`` and ``oneStepPredict``.

- `check_consistency`: simulate data (with new random effects) at the estimates; under
  a correct Laplace approximation the score of the marginal at the true parameters has
  mean zero, as the score of the joint always has. A chi-square test of the mean score
  and the implied first-order bias ``-I^-1 E[score]`` (TMB's ``summary(checkConsistency)``),
  plus, with ``estimate=True``, the bias of the refitted estimates (one ``fit_batch``).
- `one_step_predict`: one-step-ahead residuals ``Phi^-1(F(y_i | y_1..y_{i-1}))``, iid
  N(0, 1) under the model even when the latent process is correlated (ar1, spatial),
  where residuals against the conditional modes mislead.

Simulation convention: the template's ``simulate(p, d, key)`` returns the new data; if
it also returns entries named like random parameters (the simulated latent values, as
TMB's ``simulate(complete = TRUE)``), those are used for the joint score.
"""

from __future__ import annotations

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from ._internal import LazyModule

sst = LazyModule("scipy.stats")


# ---------------------------------------------------------------- checkConsistency

@dataclasses.dataclass
class ConsistencyCheck:
    """TMB's ``summary(checkConsistency(obj))``.

    ``marginal``/``joint``: dict with ``p_value`` (chi-square test that the mean score is
    zero) and ``bias`` (``-I^-1`` times the mean score, by fixed parameter); ``joint`` is
    None when the simulate function does not return the random effects. ``estimate``:
    DataFrame of the refitted estimates' mean bias and its Monte Carlo standard error.
    ``scores``: the marginal scores, one row per simulated data set.
    """

    labels: list
    marginal: dict
    joint: dict | None
    estimate: pd.DataFrame | None
    scores: np.ndarray

    def summary(self) -> pd.DataFrame:
        cols = {"bias (marginal score)": self.marginal["bias"]}
        if self.joint is not None:
            cols["bias (joint score)"] = self.joint["bias"]
        df = pd.DataFrame(cols, index=self.labels)
        if self.estimate is not None:
            df = df.join(self.estimate)
        return df

    def __repr__(self):
        joint = "NA" if self.joint is None else f"{self.joint['p_value']:.3g}"
        return (f"ConsistencyCheck(marginal p = {self.marginal['p_value']:.3g}, joint p = {joint}, "
                f"nsim = {self.scores.shape[0]})")


def _score_test(scores):
    """Mean-score chi-square test and first-order bias (TMB's ``check`` in
    ``summary.checkConsistency``): ``q = n mu' S^-1 mu ~ chi2(p)``, ``bias = -S^-1 mu``."""
    ok = np.all(np.isfinite(scores), axis=1)
    if not ok.all():
        warnings.warn(f"check_consistency: {np.sum(~ok)} simulated data sets gave no finite score (failed "
                      "inner solves) and are left out (TMB's na.rm = TRUE)", RuntimeWarning, stacklevel=4)
    scores = scores[ok]
    n = scores.shape[0]
    mu = scores.mean(axis=0)
    S = np.atleast_2d(np.cov(scores, rowvar=False))
    q = float(n * mu @ np.linalg.solve(S, mu))
    return {"p_value": float(sst.chi2.sf(q, mu.size)), "bias": -np.linalg.solve(S, mu)}


def _stack_split(model, sims):
    """(data batch, simulated random effects or None) from the simulate output."""
    sp = model.space
    if not isinstance(sims, dict):
        return sims, None
    latent = {k: v for k, v in sims.items() if k in sp.random and k not in model.data}
    data = {k: v for k, v in sims.items() if k not in latent}
    n = jax.tree_util.tree_leaves(sims)[0].shape[0]
    if isinstance(model.data, dict):
        # data the simulate function leaves out (covariates, indices) stay as they are
        for k, v in model.data.items():
            if k not in data:
                data[k] = jax.tree_util.tree_map(lambda a: jnp.broadcast_to(a, (n,) + jnp.shape(a)), v)
    if latent and set(latent) == set(sp.random):
        u = np.stack([sp.flatten({k: np.asarray(latent[k][i]) for k in latent}, "u") for i in range(n)])
        return data, u
    return data, None


def check_consistency(fit, nsim: int = 100, seed: int = 0, estimate: bool = True) -> ConsistencyCheck:
    """TMB's ``checkConsistency(obj, n = nsim)`` and its ``summary`` at the fit's estimates;
    ``estimate=True`` also refits every simulated data set (one ``fit_batch``) and reports
    the mean bias of the estimates, as TMB's earlier ``checkConsistency(estimate = TRUE)``."""
    model = fit.model
    if nsim < max(10, model.space.n_x + 1):
        raise ValueError(f"nsim must exceed the number of fixed parameters ({model.space.n_x}) and be at "
                         f"least 10 for the score test, got {nsim}")
    if model.laplace is None:
        raise ValueError("check_consistency() checks the Laplace approximation; this model has no random effects.")
    sims = fit.simulate(nsim=nsim, seed=seed)
    data, u_true = _stack_split(model, sims)
    x = jnp.asarray(fit.x)
    u0 = jnp.asarray(fit.u)
    def marginal_score(d):
        val, g, _ = model._vg(x, u0, d)
        return jnp.where(jnp.isfinite(val), g, jnp.nan)  # a failed inner solve: no score

    grad_marginal = jax.jit(jax.vmap(marginal_score))
    scores = np.asarray(grad_marginal(data))
    joint = None
    if u_true is not None:
        grad_joint = jax.jit(jax.vmap(lambda u, d: jax.grad(model.f)(x, u, d)))
        joint = _score_test(np.asarray(grad_joint(jnp.asarray(u_true), data)))
    labels = list(model.space.labels["x"])
    est = None
    if estimate:
        batch = model.fit_batch(data, start={**fit.par, **fit.par_random})
        ok = batch.converged
        if ok.mean() < 0.9:
            warnings.warn(f"check_consistency: {np.sum(~ok)} of {nsim} refits did not converge; the bias "
                          "is estimated from the others", RuntimeWarning, stacklevel=3)
        dx = batch.x[ok] - fit.x
        est = pd.DataFrame({"bias (refit)": dx.mean(axis=0),
                            "se (refit)": dx.std(axis=0, ddof=1) / np.sqrt(max(ok.sum(), 1))}, index=labels)
    return ConsistencyCheck(labels, _score_test(scores), joint, est, scores)


# ---------------------------------------------------------------- oneStepPredict

def _with_obs(data, name, y):
    d = dict(data)
    d[name] = y
    return d


def one_step_predict(fit, observation_name: str = "y", method: str = "fullGaussian",
                     discrete_support=None, seed: int = 0) -> pd.DataFrame:
    """One-step-ahead residuals (TMB's ``oneStepPredict``), in the order of the flattened
    observation array ``data[observation_name]``.

    ``method``:

    - "fullGaussian": the template is Gaussian in the observations and random effects
      jointly; their joint precision is the Hessian of the nll in (y, u), the
      observations' marginal covariance ``Sigma`` follows by a Schur complement, and the
      residuals are ``L^-1 (y - E[y])`` with ``Sigma = L L'`` (exact).
    - "oneStepGeneric": discrete observations; the template must multiply each
      observation's nll term by ``data["keep"]`` (TMB's ``DATA_VECTOR_INDICATOR``). For
      each i, the predictive mass ``P(y_i = k | y_<i)`` over ``discrete_support`` (default
      ``0..4 max(y) + 20``) is a ratio of Laplace marginals, all evaluated in one ``vmap``
      and normalized over the support; the residual is randomized,
      ``Phi^-1(F(y_i - 1) + U p(y_i))`` (TMB's oneStepGeneric with ``discrete = TRUE``).

    Returns a DataFrame with ``observation``, ``mean`` (fullGaussian) / ``cdf`` and
    ``residual``.
    """
    data = fit.data
    if observation_name not in data:
        raise ValueError(f"observation_name {observation_name!r} is not in the data; the data has {list(data)}")
    if method == "fullGaussian":
        return _osa_full_gaussian(fit, observation_name)
    if method == "oneStepGeneric":
        return _osa_generic(fit, observation_name, discrete_support, seed)
    raise ValueError(f"method must be 'fullGaussian' or 'oneStepGeneric', got {method!r}")


def _osa_full_gaussian(fit, name):
    model = fit.model
    x, u = jnp.asarray(fit.x), jnp.asarray(fit.u)
    y = jnp.asarray(fit.data[name], jnp.float64)
    shape, n = y.shape, y.size

    def f(z):
        return model.f(x, z[n:], _with_obs(fit.data, name, z[:n].reshape(shape)))

    z0 = jnp.concatenate([y.ravel(), u])
    Q = np.asarray(jax.jit(jax.hessian(f))(z0))
    g = np.asarray(jax.jit(jax.grad(f))(z0))
    # f is quadratic in (y, u): one Newton step from any point is the joint mode = mean
    Q2 = np.asarray(jax.jit(jax.hessian(f))(z0 + 1.0))
    if not np.allclose(Q, Q2, rtol=1e-6, atol=1e-8 * np.abs(Q).max()):
        raise ValueError("method='fullGaussian' needs a template that is Gaussian (quadratic nll) in the "
                         "observations and random effects jointly; use method='oneStepGeneric' for "
                         "discrete data.")
    mean = np.asarray(z0) - np.linalg.solve(Q, g)
    Qyy, Qyu, Quu = Q[:n, :n], Q[:n, n:], Q[n:, n:]
    Py = Qyy - Qyu @ np.linalg.solve(Quu, Qyu.T) if Quu.size else Qyy
    L = np.linalg.cholesky(np.linalg.inv(Py))
    import scipy.linalg as sla

    resid = sla.solve_triangular(L, np.asarray(y).ravel() - mean[:n], lower=True)
    return pd.DataFrame({"observation": np.asarray(y).ravel(), "mean": mean[:n], "residual": resid})


def _osa_generic(fit, name, support, seed):
    model = fit.model
    data = fit.data
    if "keep" not in data:
        raise ValueError(
            "method='oneStepGeneric' needs data['keep'] (ones, shaped like the observations) and a "
            "template that multiplies each observation's nll term by it, as TMB's DATA_VECTOR_INDICATOR "
            "(nll -= keep[i] * log_prob(y[i]))."
        )
    y = np.asarray(data[name], float)
    shape, n = y.shape, y.size
    if np.any(y != np.round(y)):
        raise ValueError("method='oneStepGeneric' is for discrete (integer) observations.")
    ks = np.arange(0, 4 * int(y.max()) + 21) if support is None else np.asarray(support, float)
    yf = y.ravel()
    # for observation i: keep y_<i (and y_i = k for each k in the support, or y_i dropped)
    i_idx = np.repeat(np.arange(n), ks.size + 1)
    k_val = np.tile(np.append(ks, 0.0), n)
    dropped = np.tile(np.append(np.zeros(ks.size, bool), True), n)
    x, u0 = jnp.asarray(fit.x), jnp.asarray(fit.u)

    def value(i, k, drop):
        pos = jnp.arange(n)
        keep = jnp.where(pos < i, 1.0, jnp.where((pos == i) & ~drop, 1.0, 0.0))
        yy = jnp.where(pos == i, k, jnp.asarray(yf))
        d = _with_obs(data, name, yy.reshape(shape))
        d["keep"] = keep.reshape(shape)
        val, (_, status) = model._objective(x, u0, d)
        return jnp.where(status == 0, val, jnp.nan)

    vals = np.asarray(jax.jit(jax.vmap(value))(jnp.asarray(i_idx), jnp.asarray(k_val), jnp.asarray(dropped)))
    vals = vals.reshape(n, ks.size + 1)
    logp = -(vals[:, :-1] - vals[:, -1:])  # log P(y_i = k | y_<i)
    p = np.exp(logp)
    mass = p.sum(axis=1)
    # the Laplace marginals make the masses sum to 1 only approximately: normalize, and
    # warn when the support is too narrow or the approximation is far off
    if np.any(~np.isfinite(mass)) or np.any(np.abs(mass - 1) > 0.05) or np.any(p[:, -1] > 1e-6 * mass):
        warnings.warn(
            f"oneStepGeneric: the predictive masses over the support sum to {np.nanmin(mass):.4g}..."
            f"{np.nanmax(mass):.4g} (last support point {np.nanmax(p[:, -1]):.2g}); widen "
            "discrete_support or check the inner solves", RuntimeWarning, stacklevel=3,
        )
    p = p / mass[:, None]
    below = np.sum(np.where(ks[None, :] < yf[:, None], p, 0.0), axis=1)
    at = np.sum(np.where(ks[None, :] == yf[:, None], p, 0.0), axis=1)
    U = np.random.default_rng(seed).uniform(size=n)
    cdf = np.clip(below + U * at, 1e-12, 1 - 1e-12)
    return pd.DataFrame({"observation": yf, "cdf": cdf, "residual": sst.norm.ppf(cdf)})
