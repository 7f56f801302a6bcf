"""DHARMa-style simulated residuals: calibration on data from a correct model, power on
overdispersed and zero-inflated data, and the plots (Agg backend).

Calibration: each test must reject at 5% on at most 5% + 3 Monte Carlo standard errors of
the data sets simulated from the fitted model's own family (all refits in one
``fit_batch``, all residual simulations in one vmap).
"""

import math

import matplotlib
import numpy as np
import pandas as pd
import pytest

import tmbx
from tmbx.diagnostics._residuals import SimulatedResiduals, simulate_residuals_batch

matplotlib.use("Agg")

N_GROUPS, N_PER = 15, 8
BETA, SD = (0.8, 0.4), 0.5


def _frame(seed=0):
    rng = np.random.default_rng(seed)
    g = np.repeat(np.arange(N_GROUPS), N_PER)
    x = rng.normal(size=g.size)
    return pd.DataFrame({"g": g.astype(str), "x": x})


def _poisson_counts(df, rng, extra_sd=0.0, zi=0.0):
    b = rng.normal(0, SD, N_GROUPS)[df["g"].astype(int)]
    eta = BETA[0] + BETA[1] * df["x"].to_numpy() + b + extra_sd * rng.normal(size=len(df))
    y = rng.poisson(np.exp(eta)).astype(float)
    return np.where(rng.uniform(size=len(df)) < zi, 0.0, y)


@pytest.fixture(scope="module")
def pois_fit():
    df = _frame()
    df["y"] = _poisson_counts(df, np.random.default_rng(1))
    return tmbx.glmm("y ~ x + (1|g)", data=df, family="poisson")


def _batch_pvalues(fit, y, nsim=250, seed=100):
    """p-values of the four tests (columns: uniformity, dispersion, zero-inflation,
    outliers) for each response vector in ``y`` (B, N): refits of ``fit``'s template in
    one ``fit_batch``, residual simulations in one vmap. NaN rows: refits that failed."""
    import jax

    model = fit.template.model
    n = y.shape[0]
    data = jax.tree_util.tree_map(lambda a: np.broadcast_to(np.asarray(a), (n,) + np.shape(a)), dict(model.data))
    data["y"] = y
    batch = model.fit_batch(data)
    res = simulate_residuals_batch(fit, batch, y, nsim=nsim, seed=seed)
    p = np.array([[r.test_uniformity()["p"], r.test_dispersion()["p"], r.test_zeroinflation()["p"],
                   r.test_outliers()["p"]] for r in res])
    p[~batch.converged] = np.nan
    return p


def _responses(df, n, seed, **kw):
    rng = np.random.default_rng(seed)
    return np.stack([_poisson_counts(df, rng, **kw) for _ in range(n)])


def _assert_calibrated(p):
    ok = ~np.isnan(p[:, 0])
    assert ok.mean() > 0.95
    rates = (p[ok] < 0.05).mean(axis=0)
    limit = 0.05 + 3 * math.sqrt(0.05 * 0.95 / ok.sum())
    assert np.all(rates <= limit), dict(zip(["uniformity", "dispersion", "zeroinflation", "outliers"], rates))


N_NULL, N_ALT = 60, 6


@pytest.fixture(scope="module")
def batch_p(pois_fit):
    # 60 data sets from the model, 6 overdispersed, 6 zero-inflated: one batch, one compile
    df = pois_fit.call["data"]
    y = np.concatenate([_responses(df, N_NULL, 100), _responses(df, N_ALT, 200, extra_sd=1.0),
                        _responses(df, N_ALT, 300, zi=0.35)])
    return _batch_pvalues(pois_fit, y)


def test_calibration_fast(batch_p):
    _assert_calibrated(batch_p[:N_NULL])


@pytest.mark.slow
def test_calibration_200(pois_fit):
    _assert_calibrated(_batch_pvalues(pois_fit, _responses(pois_fit.call["data"], 200, 7), seed=7))


def test_detects_overdispersion_and_zero_inflation(batch_p):
    od = batch_p[N_NULL:N_NULL + N_ALT]
    zi = batch_p[N_NULL + N_ALT:]
    # overdispersion (lognormal noise, sd 1 on the log scale): the dispersion or the
    # uniformity test rejects on every data set
    assert np.all(np.minimum(od[:, 0], od[:, 1]) < 0.05)
    # 35% structural zeros: the zero-inflation test rejects on every data set
    assert np.all(zi[:, 2] < 0.05)


def test_correct_model_passes(pois_fit):
    res = pois_fit.simulate_residuals(nsim=250, seed=0)
    assert res.scaled_residuals.shape == (N_GROUPS * N_PER,)
    assert np.all((res.scaled_residuals >= 0) & (res.scaled_residuals <= 1))
    # same seed, same residuals; the draws are fit.simulate's
    np.testing.assert_array_equal(res.scaled_residuals, pois_fit.simulate_residuals(seed=0).scaled_residuals)
    np.testing.assert_array_equal(res.simulated, pois_fit.simulate(nsim=250, seed=0))


@pytest.mark.slow
def test_conditional_simulation_dispersion_power():
    # DHARMa's re.form = NULL: simulating at the conditional modes of the random effects
    # detects moderate overdispersion that the unconditional test misses more often
    df = _frame(3)
    df["y"] = _poisson_counts(df, np.random.default_rng(12), extra_sd=0.5)
    fit = tmbx.glmm("y ~ x + (1|g)", data=df, family="poisson")
    t = fit.simulate_residuals(seed=1, conditional=True).test_dispersion()
    assert t["ratio"] > 1.3 and t["p"] < 0.01


def test_pit_closed_form():
    # one observation, simulations {0, 1, 1, 2}: y = 1 has r in [1/4, 3/4];
    # y = 3 above every simulation is an outlier at r = 1
    sims = np.array([[0.0, 0, 3], [1, 1, 3], [1, 2, 3], [2, 2, 3]])
    res = SimulatedResiduals.from_simulations([1.0, 3.0, 2.0], sims, seed=0)
    assert 0.25 <= res.scaled_residuals[0] <= 0.75
    assert res.scaled_residuals[1] == 1.0
    assert res.scaled_residuals[2] == 0.0
    assert res.test_outliers()["outliers"] == 2
    with pytest.raises(ValueError, match="shape"):
        SimulatedResiduals.from_simulations([1.0, 2.0], sims)


def test_bad_nsim(pois_fit):
    with pytest.raises(ValueError, match="nsim"):
        pois_fit.simulate_residuals(nsim=1)


def test_residual_plot(pois_fit):
    fig = pois_fit.simulate_residuals(nsim=250, seed=2).plot()
    ax1, ax2 = fig.axes
    assert ax1.get_title() == "QQ plot residuals"
    assert "KS test" in ax1.texts[0].get_text()
    assert ax2.get_xlabel().startswith("Model predictions")
    assert len(ax2.get_legend().get_texts()) == 3


def test_fit_plot_panel(pois_fit):
    fig = pois_fit.plot()
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["Residuals vs fitted", "Normal Q-Q", "Scale-location", "Random effects Q-Q"]
    n = N_GROUPS * N_PER
    assert len(fig.axes[0].lines[0].get_xdata()) == n
    np.testing.assert_allclose(np.sort(fig.axes[0].lines[0].get_ydata()),
                               np.sort(pois_fit.residuals(type="pearson")))
    assert len(fig.axes[3].lines[0].get_xdata()) == N_GROUPS
    with pytest.raises(ValueError, match="pearson"):
        pois_fit.plot(type="raw")


def test_ranef_caterpillar(pois_fit):
    fig = pois_fit.plot_ranef(level=0.9)
    (ax,) = fig.axes
    re = pois_fit.ranef(condVar=True)["g"]
    col = re.columns[0]
    assert ax.get_title() == f"{col} | g"
    assert len(ax.get_yticks()) == N_GROUPS
    re = re.sort_values(col)
    # the error bars are mode -/+ qnorm(0.95) * condVar sd, sorted by mode
    segs = ax.collections[0].get_segments()
    lo = np.array([s[0][0] for s in segs])
    from scipy.stats import norm

    np.testing.assert_allclose(lo, re[col] - norm.ppf(0.95) * re[f"se:{col}"], rtol=1e-10)
    with pytest.raises(ValueError, match="grouping factor"):
        pois_fit.plot_ranef(group="nope")
