"""DHARMa's simulation-based (scaled, quantile) residuals and their tests.

For each observation ``y_i`` and ``nsim`` responses ``s_i1..s_in`` simulated from the
fitted model with new random effects (DHARMa's default, ``re.form = NA``), the scaled
residual is the randomized probability integral transform

    r_i = mean(s_ij < y_i) + U_i * mean(s_ij == y_i),    U_i ~ Uniform(0, 1),

uniform on (0, 1) under a correct model for discrete and continuous responses alike
(DHARMa's ``getQuantile`` with ``integerResponse``). Simulation is one ``vmap``; many
fits (``simulate_residuals_batch``) are simulated in one more ``vmap``.
"""

from __future__ import annotations

import dataclasses
import weakref

import jax
import jax.numpy as jnp
import numpy as np

from .._internal import LazyModule

sst = LazyModule("scipy.stats")


def _two_sided(simulated: np.ndarray, observed: float) -> float:
    """DHARMa's ``getP(alternative = "two.sided")``: twice the smaller tail frequency."""
    return float(min(1.0, 2 * min(np.mean(simulated <= observed), np.mean(simulated >= observed))))


@dataclasses.dataclass
class SimulatedResiduals:
    """DHARMa's ``simulateResiduals`` output.

    Fields: ``observed`` (N,) responses (successes for binomial data); ``simulated``
    (nsim, N) simulated responses; ``predicted`` (N,) the model's predictions (for plots);
    ``scaled_residuals`` (N,) the randomized PIT values in [0, 1].
    """

    observed: np.ndarray
    simulated: np.ndarray
    predicted: np.ndarray
    scaled_residuals: np.ndarray

    @classmethod
    def from_simulations(cls, observed, simulated, predicted=None, seed: int = 0):
        y = np.asarray(observed, float)
        sims = np.asarray(simulated, float)
        if sims.ndim != 2 or sims.shape[1] != y.shape[0]:
            raise ValueError(f"simulated must have shape (nsim, {y.shape[0]}); got {sims.shape}")
        if not np.all(np.isfinite(sims)):
            raise ValueError("some simulated responses are not finite: check the fit's parameters "
                             "(a huge dispersion or linear predictor) before checking its residuals")
        u = np.random.default_rng(seed).uniform(size=y.shape)
        r = np.mean(sims < y, axis=0) + u * np.mean(sims == y, axis=0)
        pred = np.mean(sims, axis=0) if predicted is None else np.asarray(predicted, float)
        return cls(y, sims, pred, r)

    @property
    def nsim(self) -> int:
        return self.simulated.shape[0]

    # ------------------------------------------------------------ tests
    def test_uniformity(self) -> dict:
        """Kolmogorov-Smirnov test of the scaled residuals against Uniform(0, 1)
        (DHARMa's ``testUniformity``): {"statistic": D, "p": p-value}."""
        res = sst.kstest(self.scaled_residuals, "uniform")
        return {"statistic": float(res.statistic), "p": float(res.pvalue)}

    def test_dispersion(self) -> dict:
        """Simulation-based dispersion test (DHARMa's ``testDispersion``, type "DHARMa"):
        the sd of ``y - m`` over observations (``m`` the mean of the simulations) against the
        same sd for each simulated data set; ``ratio`` > 1 is overdispersion; two-sided p."""
        m = self.simulated.mean(axis=0)
        observed = np.std(self.observed - m, ddof=1)
        simulated = np.std(self.simulated - m, axis=1, ddof=1)
        return {"ratio": float(observed / simulated.mean()), "p": _two_sided(simulated, observed)}

    def test_zeroinflation(self) -> dict:
        """Observed number of zeros against its simulated distribution (DHARMa's
        ``testZeroInflation``): ``ratio`` = observed / mean simulated; two-sided p."""
        observed = float(np.sum(self.observed == 0))
        simulated = np.sum(self.simulated == 0, axis=1).astype(float)
        ratio = observed / simulated.mean() if simulated.mean() > 0 else float("inf") if observed else 1.0
        return {"observed": observed, "expected": float(simulated.mean()), "ratio": float(ratio),
                "p": _two_sided(simulated, observed)}

    def test_outliers(self) -> dict:
        """Binomial test of the number of observations outside the range of all their
        simulations (scaled residual exactly 0 or 1) against ``2 / (nsim + 1)`` per
        observation (DHARMa's ``testOutliers``, type "binomial", margin "both"); two-sided."""
        k = int(np.sum((self.scaled_residuals == 0) | (self.scaled_residuals == 1)))
        n = self.observed.shape[0]
        p0 = 2.0 / (self.nsim + 1)
        res = sst.binomtest(k, n, p0)
        return {"outliers": k, "expected": n * p0, "p": float(res.pvalue)}

    # ------------------------------------------------------------ plot
    def plot(self, quantiles=(0.25, 0.5, 0.75), bins: int = 10):
        """DHARMa's ``plot``: QQ plot of the scaled residuals against Uniform(0, 1) (with
        the KS, dispersion and outlier p-values), and residuals against rank-transformed
        predictions with binned quantiles. Returns the matplotlib Figure."""
        import matplotlib.pyplot as plt

        r = self.scaled_residuals
        n = r.shape[0]
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4.5))
        expected = (np.arange(1, n + 1) - 0.5) / n
        ax1.plot(expected, np.sort(r), ".", ms=3)
        ax1.plot([0, 1], [0, 1], "r-", lw=1)
        ax1.set(xlabel="Expected", ylabel="Observed", title="QQ plot residuals")
        tests = (("KS test", self.test_uniformity()), ("Dispersion test", self.test_dispersion()),
                 ("Outlier test", self.test_outliers()))
        text = "\n".join(f"{name}: p = {t['p']:.3g}" for name, t in tests)
        ax1.text(0.04, 0.96, text, transform=ax1.transAxes, va="top", fontsize=8)

        rank = (sst.rankdata(self.predicted) - 0.5) / n
        ax2.plot(rank, r, ".", ms=3, alpha=0.6)
        edges = np.linspace(0, 1, bins + 1)
        centers = 0.5 * (edges[1:] + edges[:-1])
        which = np.clip(np.searchsorted(edges, rank, side="right") - 1, 0, bins - 1)
        for q in quantiles:
            ax2.axhline(q, color="grey", ls="--", lw=0.8)
            line = [np.quantile(r[which == b], q) if np.any(which == b) else np.nan for b in range(bins)]
            ax2.plot(centers, line, "-", lw=1.5, label=f"{q:g} quantile")
        ax2.set(xlabel="Model predictions (rank transformed)", ylabel="DHARMa residual",
                title="Residual vs. predicted", ylim=(0, 1))
        ax2.legend(fontsize=7, loc="upper right")
        fig.tight_layout()
        return fig

    def __repr__(self):
        return f"SimulatedResiduals(n={self.observed.shape[0]}, nsim={self.nsim})"


# ------------------------------------------------------------------ simulation

def _draw_fn(fit, conditional: bool = False):
    """``(p, key) -> y``: one response vector from parameters ``p`` with new random effects
    (glmmTMB's ``simulate``, as ``GlmmFit.simulate`` but a pure function of ``p`` so it can
    be vmapped over the members of a batch of refits); ``conditional``: keep the random
    effects at ``p``'s values (their conditional modes; DHARMa's ``re.form = NULL``)."""
    fam = fit.family
    _, d = fit._newdata(None)
    trials = None if fit.design.trials is None else jnp.asarray(fit.design.trials)

    def one(p, key):
        k1, k2, k3 = jax.random.split(key, 3)
        q = dict(p)
        for name, k in (("b", k1), ("bzi", k2)):
            if name in q and not conditional:
                q[name] = jax.random.normal(k, q[name].shape)
        eta, zi, disp = fit._linear_predictors(q, d)
        return fam.sample(k3, eta, disp=disp, psi=q.get("psi"), zi=zi, trials=trials)

    return one


def _check_nsim(nsim):
    if not isinstance(nsim, (int, np.integer)) or nsim < 2:
        raise ValueError(f"nsim must be an integer of at least 2 (DHARMa's default is 250), got {nsim!r}")


def _simulator(fit, conditional: bool, jitted: bool = True):
    """``(p, keys) -> (len(keys), N)`` simulations, jitted (with the model's compiler
    options: a small model's sampler compiles faster at level 0) and cached per fit so
    that repeated residual checks (and plots) of one fit compile once; ``jitted=False``:
    the plain function, for a caller's own program."""
    cache = _SIMULATORS.setdefault(id(fit), {})
    if conditional not in cache:
        many = jax.vmap(_draw_fn(fit, conditional=conditional), in_axes=(None, 0))
        cache[conditional] = (many, fit.model.jit(many))
        weakref.finalize(fit, _SIMULATORS.pop, id(fit), None)
    return cache[conditional][1 if jitted else 0]


_SIMULATORS: dict = {}


def simulate_residuals(fit, nsim: int = 250, seed: int = 0, conditional: bool = False) -> SimulatedResiduals:
    """DHARMa's ``simulateResiduals(fit, n = nsim)``: scaled residuals from ``nsim``
    simulations of the fit with new random effects (DHARMa's default, exact under the
    model; the same draws as ``fit.simulate(nsim, seed)``), or with ``conditional=True``
    at the random effects' conditional modes (DHARMa's ``re.form = NULL``: more power
    against overdispersion, but the modes' shrinkage makes the tests only approximately
    calibrated)."""
    _check_nsim(nsim)
    p = {k: jnp.asarray(v) for k, v in fit._par().items()}
    keys = jax.random.split(jax.random.PRNGKey(seed), nsim)
    sims = np.asarray(_simulator(fit, conditional)(p, keys))
    return SimulatedResiduals.from_simulations(fit.design.y, sims, fit.predict(type="response"), seed=seed)


def simulate_residuals_batch(fit, batch, y, nsim: int = 250, seed: int = 0, conditional: bool = False) -> list:
    """Scaled residuals of every member of a batch of refits of ``fit``'s template
    (``fit.template.model.fit_batch`` on responses ``y``, shape (B, N)); the simulations
    of all members are one jitted ``vmap`` (``conditional`` as in `simulate_residuals`).
    Returns a list of `SimulatedResiduals`."""
    _check_nsim(nsim)
    sp = fit.model.space
    y = np.asarray(y, float)
    sim = _simulator(fit, conditional, jitted=False)
    members = fit.model.jit(jax.vmap(lambda x, u, k: sim(sp.unflatten(x, u), k)))
    keys = jax.random.split(jax.random.PRNGKey(seed), len(batch) * nsim).reshape(len(batch), nsim, -1)
    sims = np.asarray(members(jnp.asarray(batch.x), jnp.asarray(batch.res["u"]), keys))
    return [SimulatedResiduals.from_simulations(y[i], sims[i], seed=seed + i) for i in range(len(batch))]
