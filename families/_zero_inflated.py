"""Zero inflation: a wrapper around any base family."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ._base import Family
from ._math import as_float, log_sigmoid


def require_zi(zi, what: str):
    if zi is None:
        raise ValueError(
            f"{what} needs zi, the logit of the zero probability (glmmTMB's "
            "zero-inflation linear predictor, e.g. zi=0.0 for probability 1/2)."
        )
    return as_float(zi)


def resolve_base(base, wrapper: str) -> Family:
    if isinstance(base, str):
        from ._registry import get  # late import: the registry imports this module

        base = get(base)
    if not isinstance(base, Family):
        raise TypeError(f"{wrapper} wraps a Family instance (e.g. {wrapper}(Poisson())); got {base!r}.")
    if getattr(base, "_takes_zi", False) or (wrapper == "Truncated" and isinstance(base, _Delegating)):
        raise TypeError(f"{wrapper}({type(base).__name__}(...)) is not supported: a model has one zero part.")
    return base


class _Delegating(Family):
    """Family wrapping ``base``: the ClassVar-like attributes come from ``base``."""

    base: Family

    @property
    def has_disp(self):
        return self.base.has_disp

    @property
    def n_psi(self):
        return self.base.n_psi

    @property
    def has_norm(self):
        return self.base.has_norm

    def _log_norm(self, y, trials):
        # the base's at the nonzero responses, 0 at the zeros (where the wrapper's own
        # zero mass stands, or -inf for a truncated family)
        zero = y == 0
        norm = self.base._log_norm(jnp.where(zero, self.base.support_point, y), trials)
        return None if norm is None else jnp.where(zero, 0.0, norm)

    @property
    def psi_start(self):
        return self.base.psi_start

    @property
    def needs_trials(self):
        return self.base.needs_trials

    @property
    def default_link(self):
        return self.base.default_link

    @property
    def allowed_links(self):
        return self.base.allowed_links

    @property
    def discrete(self):
        return self.base.discrete

    @property
    def nonnegative(self):
        return self.base.nonnegative

    @property
    def support_point(self):
        return self.base.support_point

    def sigma(self, disp, psi=None):
        return self.base.sigma(disp, psi)

    def _base_args(self, eta, disp, psi, trials):
        d, p, t = self.base._args(disp, psi, None, trials)
        return as_float(eta), d, p, t


class _ZeroWrapper(_Delegating):
    """A wrapper with a zero predictor ``zi``: public methods validate the arguments
    and run the ``_zi_*`` hooks."""

    _takes_zi = True

    def _zi_args(self, eta, disp, psi, zi, trials):
        zi = require_zi(zi, type(self).__name__)
        return (*self._base_args(eta, disp, psi, trials), zi)

    def log_prob(self, y, eta, disp=None, psi=None, zi=None, trials=None, norm=None):
        y, args = as_float(y), self._zi_args(eta, disp, psi, zi, trials)
        if norm is None:
            return self._zi_log_prob(y, *args)
        return self._zi_log_prob(y, *args, kernel=True) + norm

    def mean(self, eta, disp=None, psi=None, zi=None, trials=None):
        return self._zi_mean(*self._zi_args(eta, disp, psi, zi, trials))

    def variance(self, eta, disp=None, psi=None, zi=None, trials=None):
        return self._zi_variance(*self._zi_args(eta, disp, psi, zi, trials))

    def sample(self, key, eta, disp=None, psi=None, zi=None, trials=None):
        return self._zi_sample(key, *self._zi_args(eta, disp, psi, zi, trials))

    def cdf(self, y, eta, disp=None, psi=None, zi=None, trials=None):
        return self._zi_cdf(as_float(y), *self._zi_args(eta, disp, psi, zi, trials))

    def deviance_residuals(self, y, eta, disp=None, psi=None, trials=None):
        raise NotImplementedError(f"Deviance residuals are not defined for {type(self).__name__} families.")

    def log_prob_zero(self, eta, disp=None, psi=None, trials=None):
        raise NotImplementedError(f"{type(self).__name__}: the zero probability is set by zi.")


class ZeroInflated(_ZeroWrapper):
    """Zero-inflated ``base``: ``P(0) = pz + (1 - pz) P_base(0)``, ``f(y) = (1 - pz) f_base(y)`` for ``y != 0``.

    ``zi = logit(pz)`` (glmmTMB's ``ziformula`` linear predictor), combined on
    the log scale: ``logaddexp(log_sigmoid(zi), log_sigmoid(-zi) + log P_base(0))``
    (glmmTMB's ``logspace_add``). Works for any base family with
    ``_log_prob_zero``; for continuous bases without mass at 0 (Gamma, beta,
    lognormal) zeros get probability ``pz`` only, which is glmmTMB's
    ``ziGamma``/zero-inflated beta (there it equals the hurdle model).
    (glmmTMB mixes the *density* at 0 into the zero probability for gaussian,
    t and skewnormal; here a continuous density has no mass at 0.)

    ``E = (1 - pz) E_base``, ``Var = (1 - pz) Var_base + pz (1 - pz) E_base^2``.

    glmmTMB: ``family = base, ziformula = ~ ...``.
    """

    def __init__(self, base: Family | str):
        self.base = resolve_base(base, "ZeroInflated")
        self.link = self.base.link

    @property
    def name(self):
        return self.base.name

    def _zi_log_prob(self, y, eta, d, p, t, zi, kernel=False):
        # (``kernel``: less `_log_norm`, which is 0 at the zeros)
        zero = y == 0
        y_base = jnp.where(zero, self.base.support_point, y)
        both = self.base._log_kernel_and_zero if kernel else self.base._log_prob_and_zero
        log_base, log_base0 = both(y_base, eta, d, p, t)
        log_zero = jnp.logaddexp(log_sigmoid(zi), log_sigmoid(-zi) + log_base0)
        return jnp.where(zero, log_zero, log_sigmoid(-zi) + log_base)

    def _zi_mean(self, eta, d, p, t, zi):
        return jax.nn.sigmoid(-zi) * self.base._mean(eta, d, p, t)

    def _zi_variance(self, eta, d, p, t, zi):
        pz = jax.nn.sigmoid(zi)
        m = self.base._mean(eta, d, p, t)
        return (1.0 - pz) * self.base._variance(eta, d, p, t) + pz * (1.0 - pz) * m * m

    def _zi_sample(self, key, eta, d, p, t, zi):
        k1, k2 = jax.random.split(key)
        draw = self.base._sample(k1, eta, d, p, t)
        structural = jax.random.uniform(k2, jnp.broadcast_shapes(draw.shape, zi.shape)) < jax.nn.sigmoid(zi)
        return jnp.where(structural, 0.0, draw)

    def _zi_cdf(self, y, eta, d, p, t, zi):
        pz = jax.nn.sigmoid(zi)
        return jnp.where(y >= 0, pz, 0.0) + (1.0 - pz) * self.base._cdf(y, eta, d, p, t)

    def check_support(self, y, trials=None):
        y = np.asarray(y, dtype=float)
        if self.base.discrete:
            self.base.check_support(y, trials)
            return
        keep = y != 0
        t = None if trials is None else np.broadcast_to(np.asarray(trials, float), y.shape)[keep]
        self.base.check_support(y[keep], t)
