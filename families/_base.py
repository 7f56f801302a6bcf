"""The abstract response family and the conventions every family follows.

A family maps the linear predictors of one observation to the distribution
of its response:

- ``eta``: conditional-mean linear predictor (link scale), ``mu = link.inverse(eta)``;
- ``disp``: glmmTMB's dispersion linear predictor (``betadisp``; per
  observation or scalar), always on a log scale whose meaning each family
  states (e.g. ``log(theta)`` for nbinom2). Ignored when ``has_disp`` is False;
- ``psi``: 1-d array of the family's extra shape parameters, unconstrained,
  with glmmTMB's transforms (e.g. Tweedie power ``1 + plogis(psi[0])``);
- ``zi``: logit of the zero-inflation / hurdle probability; only the wrappers
  (``ZeroInflated``, ``Hurdle``) accept it, base families raise if it is given;
- ``trials``: number of trials for binomial-type families. ``y`` is then the
  number of successes (the formula layer converts proportions with weights and
  ``cbind(successes, failures)`` to successes/trials).

Writing a family: subclass ``Family``, set the ClassVars, and implement
``_log_prob`` (required) plus whichever of ``_mean``, ``_variance``,
``_sample``, ``_cdf``, ``_deviance_residuals`` and ``_check_support`` apply.
A family whose log density has a part that depends on the data alone (the
``-log(y!)`` of count families) may split it off: ``_log_norm(y, trials)``
returns that part and ``_log_kernel`` the rest, in place of ``_log_prob``
(their sum).
A fit evaluates the log density at the same responses hundreds of times;
`log_norm` computes the data's part once and `log_prob` takes it as ``norm``.
The public methods (``log_prob``, ``mean``, ...) validate and convert the
arguments once and call these hooks with ``disp``/``psi``/``trials`` already
arrays (``None`` where the family does not use them).
"""

from __future__ import annotations

from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._links import Link, get_link
from ._math import as_float

__all__ = ["Family", "Link"]


class Family(eqx.Module):
    """Abstract response family (a frozen ``eqx.Module``; concrete families are final).

    Fields:
        link: the ``Link`` of the conditional mean.

    ClassVars:
        name: glmmTMB's family name (``family(fit)$family``).
        has_disp: glmmTMB estimates ``betadisp`` for this family.
        n_psi: number of extra shape parameters (glmmTMB's ``psi``).
        psi_start: glmmTMB's starting values for ``psi``.
        discrete: the response is a count (integer valued).
        nonnegative: the support lies in ``[0, inf)`` (truncation/hurdle allowed).
        needs_trials: ``y`` counts successes out of ``trials``.
        default_link, allowed_links: link names (R's ``make.link`` names).
        support_point: a point inside the support, used by the wrappers to
            replace responses they mask out (keeps gradients finite).
    """

    link: Link

    name: ClassVar[str]
    has_disp: ClassVar[bool] = False
    n_psi: ClassVar[int] = 0
    psi_start: ClassVar[tuple[float, ...]] = ()
    discrete: ClassVar[bool] = False
    nonnegative: ClassVar[bool] = False
    needs_trials: ClassVar[bool] = False
    default_link: ClassVar[str] = "identity"
    allowed_links: ClassVar[tuple[str, ...]] = ("identity",)
    support_point: ClassVar[float] = 1.0

    def __init__(self, link: str | Link | None = None):
        link = get_link(self.default_link if link is None else link)
        if link.name not in self.allowed_links:
            raise ValueError(
                f"Link {link.name!r} is not available for the {self.name} family; "
                f"use one of {', '.join(repr(x) for x in self.allowed_links)}."
            )
        self.link = link

    # ------------------------------------------------------------------ hooks
    def _log_prob(self, y, eta, disp, psi, trials):
        if type(self)._log_kernel is not Family._log_kernel:  # split: kernel + data-only part
            return self._log_kernel(y, eta, disp, psi, trials) + self._log_norm(y, trials)
        raise NotImplementedError(f"{type(self).__name__} does not define _log_prob.")

    def _mean(self, eta, disp, psi, trials):
        return self.link.inverse(eta)

    def _variance(self, eta, disp, psi, trials):
        raise NotImplementedError(f"variance() is not available for the {self.name} family.")

    def _sample(self, key, eta, disp, psi, trials):
        if type(self)._quantile is not Family._quantile:
            shape = jnp.broadcast_shapes(*(jnp.shape(a) for a in (eta, disp, trials) if a is not None))
            u = jax.random.uniform(key, shape, jnp.result_type(float))
            return self._quantile(u, eta, disp, psi, trials)
        raise NotImplementedError(f"sample() is not available for the {self.name} family.")

    def _quantile(self, u, eta, disp, psi, trials):
        """Inverse cdf (smallest ``y`` with ``cdf(y) >= u``), where the family has one;
        it gives ``sample`` and exact sampling of the zero-truncated family."""
        raise NotImplementedError(f"No quantile function for the {self.name} family.")

    def _cdf(self, y, eta, disp, psi, trials):
        raise NotImplementedError(f"cdf() is not available for the {self.name} family.")

    def _deviance_residuals(self, y, eta, disp, psi, trials):
        raise NotImplementedError(
            f"Deviance residuals are not defined for the {self.name} family "
            "(neither R nor glmmTMB define its deviance); use Pearson or "
            "randomized quantile residuals instead."
        )

    def _check_support(self, y, trials):
        pass

    def _log_norm(self, y, trials):
        """The part of ``_log_prob`` that depends on ``y`` and ``trials`` alone
        (``-log(y!)``, ``log(n choose y)``), or None where the family splits none off."""
        return None

    def _log_kernel(self, y, eta, disp, psi, trials):
        """``_log_prob`` less `_log_norm` (the same where the family splits none off)."""
        return self._log_prob(y, eta, disp, psi, trials)

    def _log_kernel_and_zero(self, y, eta, disp, psi, trials):
        """``(_log_kernel(y), log P(Y = 0))``, as `_log_prob_and_zero`."""
        if not self.has_norm:
            return self._log_prob_and_zero(y, eta, disp, psi, trials)
        return self._log_kernel(y, eta, disp, psi, trials), self._log_prob_zero(eta, disp, psi, trials)

    def _log_prob_zero(self, eta, disp, psi, trials):
        """``log P(Y = 0)``: the base family's mass at zero (wrappers need it)."""
        if self.discrete:
            zero = jnp.zeros(jnp.shape(eta), dtype=jnp.result_type(float))
            return self._log_prob(zero, eta, disp, psi, trials)
        return jnp.full(jnp.shape(eta), -jnp.inf)

    def _log_prob_and_zero(self, y, eta, disp, psi, trials):
        """``(log_prob(y), log P(Y = 0))`` together; families whose evaluation
        has an expensive shared part (COM-Poisson) override it for the wrappers."""
        return self._log_prob(y, eta, disp, psi, trials), self._log_prob_zero(eta, disp, psi, trials)

    # ------------------------------------------------------ argument handling
    def _disp(self, disp):
        if not self.has_disp:
            return None
        if disp is None:
            raise ValueError(
                f"The {self.name} family has a dispersion parameter: pass disp "
                "(glmmTMB's dispersion linear predictor, e.g. disp=0.0)."
            )
        return as_float(disp)

    def _psi(self, psi):
        if self.n_psi == 0:
            return None
        if psi is None:
            raise ValueError(
                f"The {self.name} family has {self.n_psi} shape parameter(s) psi; "
                f"pass psi (e.g. psi={list(self.psi_start)}, glmmTMB's start)."
            )
        psi = jnp.atleast_1d(as_float(psi))
        if psi.ndim != 1 or psi.shape[0] != self.n_psi:
            raise ValueError(
                f"The {self.name} family expects psi of shape ({self.n_psi},); "
                f"got shape {psi.shape}."
            )
        return psi

    def _trials(self, trials):
        if not self.needs_trials:
            return None
        return as_float(1.0 if trials is None else trials)

    def _no_zi(self, zi):
        if zi is not None:
            raise ValueError(
                f"The {self.name} family got a zero-inflation predictor zi; wrap the "
                f"family instead: ZeroInflated({type(self).__name__}()) or "
                f"Hurdle({type(self).__name__}())."
            )

    def _args(self, disp, psi, zi, trials):
        self._no_zi(zi)
        return self._disp(disp), self._psi(psi), self._trials(trials)

    # ----------------------------------------------------------- public API
    def log_prob(self, y, eta, disp=None, psi=None, zi=None, trials=None, norm=None):
        """Log density (continuous) or log mass (discrete) of each observation.

        ``norm``: `log_norm` of the same ``y`` (and ``trials``), computed
        beforehand; the part of the density that depends on the data alone is
        then not computed again."""
        d, p, t = self._args(disp, psi, zi, trials)
        if norm is None:
            return self._log_prob(as_float(y), as_float(eta), d, p, t)
        return self._log_kernel(as_float(y), as_float(eta), d, p, t) + norm

    @property
    def has_norm(self) -> bool:
        """Whether `log_norm` splits a data-only part off (is not None)."""
        return type(self)._log_norm is not Family._log_norm

    def log_norm(self, y, trials=None):
        """The part of `log_prob` that depends on the data alone, per observation
        (``-log(y!)`` for Poisson counts), or None where the family splits none off:
        ``log_prob(y, eta, ..., norm=log_norm(y))`` equals ``log_prob(y, eta, ...)``
        and skips it. (A fit evaluates the density at the same ``y`` hundreds of
        times: on the 1e5-row Poisson ladder its ``lgamma`` calls were a tenth of
        a fit's time.)"""
        return self._log_norm(as_float(y), self._trials(trials))

    def mean(self, eta, disp=None, psi=None, zi=None, trials=None):
        """``E[y]`` (binomial-type families: the mean of the proportion ``y / trials``)."""
        d, p, t = self._args(disp, psi, zi, trials)
        return self._mean(as_float(eta), d, p, t)

    def variance(self, eta, disp=None, psi=None, zi=None, trials=None):
        """``Var[y]`` (binomial-type families: the variance of ``y / trials``)."""
        d, p, t = self._args(disp, psi, zi, trials)
        return self._variance(as_float(eta), d, p, t)

    def sample(self, key, eta, disp=None, psi=None, zi=None, trials=None):
        """One draw per observation (binomial-type families: successes, like ``y``)."""
        d, p, t = self._args(disp, psi, zi, trials)
        return self._sample(key, as_float(eta), d, p, t)

    def cdf(self, y, eta, disp=None, psi=None, zi=None, trials=None):
        """``P(Y <= y)``, for randomized quantile residuals."""
        d, p, t = self._args(disp, psi, zi, trials)
        return self._cdf(as_float(y), as_float(eta), d, p, t)

    def deviance_residuals(self, y, eta, disp=None, psi=None, trials=None):
        """``sign(y - mu) * sqrt(unit deviance)`` as R's ``family$dev.resids``."""
        d, p, t = self._args(disp, psi, None, trials)
        return self._deviance_residuals(as_float(y), as_float(eta), d, p, t)

    def log_prob_zero(self, eta, disp=None, psi=None, trials=None):
        """``log P(Y = 0)`` (``-inf`` for continuous families without mass at 0)."""
        d, p, t = self._args(disp, psi, None, trials)
        return self._log_prob_zero(as_float(eta), d, p, t)

    def sigma(self, disp, psi=None):
        """glmmTMB's ``sigma()`` for this family (1.0 where it has no dispersion)."""
        if not self.has_disp:
            return 1.0
        return jnp.exp(as_float(disp))

    def check_support(self, y, trials=None):
        """Raise ``ValueError`` (saying what is wrong and how to fix it) if ``y`` is
        outside the family's support. NumPy-side; call it before fitting."""
        y = np.asarray(y, dtype=float)
        if np.isnan(y).any():
            raise ValueError(
                f"The response for the {self.name} family contains {int(np.isnan(y).sum())} "
                "missing value(s); drop those rows first (glmmTMB drops them)."
            )
        if np.isinf(y).any():
            raise ValueError(f"The response for the {self.name} family contains infinite values.")
        self._check_support(y, trials)


# ---------------------------------------------------------------- support checks
def _bad(y, mask, family: str, what: str, fix: str):
    """Raise a ValueError listing the first offending responses."""
    if np.any(mask):
        idx = np.flatnonzero(np.ravel(mask))
        vals = np.ravel(y)[idx[:5]]
        raise ValueError(
            f"The {family} family needs {what}; {idx.size} response(s) are not "
            f"(first at positions {idx[:5].tolist()}: {vals.tolist()}). {fix}"
        )


def require_counts(y, family: str):
    """Non-negative integers."""
    _bad(y, y < 0, family, "non-negative counts", "Counts cannot be negative.")
    _bad(
        y,
        y != np.round(y),
        family,
        "integer counts",
        "Round the response, or use a continuous family (e.g. tweedie, Gamma).",
    )


def require_positive(y, family: str, allow_zero_hint: bool = True):
    hint = (
        "For zeros use ZeroInflated(...) / Hurdle(...) (a zi formula in glmmTMB), "
        "or the tweedie family."
        if allow_zero_hint
        else ""
    )
    _bad(y, y <= 0, family, "strictly positive responses", hint)


def require_unit_interval(y, family: str, closed: bool):
    if closed:
        _bad(y, (y < 0) | (y > 1), family, "responses in [0, 1]", "Rescale the response.")
    else:
        _bad(
            y,
            (y <= 0) | (y >= 1),
            family,
            "responses strictly inside (0, 1)",
            "For exact 0s and 1s use the ordbeta family; for exact zeros "
            "ZeroInflated(Beta()); or squeeze (y * (n - 1) + 0.5) / n.",
        )

