"""Link functions: ``eta = link(mu)``, ``mu = link.inverse(eta)``.

Each link is a field-less frozen ``eqx.Module``. Besides the textbook trio
(``__call__``, ``inverse``, ``mu_eta``) a link offers the stable log-scale
forms glmmTMB uses (``log_inverse_linkfun``, ``logit_inverse_linkfun``,
``log1m_inverse_linkfun`` in glmmTMB.cpp), so that e.g. a logit-link binomial
never forms ``p`` and ``1 - p`` explicitly and a log-link count family works
with ``log(mu) = eta`` even where ``exp(eta)`` overflows.

Names are R's (``make.link``): identity, log, logit, probit, cloglog,
inverse, sqrt. glmmTMB evaluates its links in C++ without R's clamping of
``mu`` to ``[eps, 1 - eps]``; so do we.
"""

from __future__ import annotations

import abc
from typing import ClassVar, final

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.scipy.special import log_ndtr, ndtr, ndtri

from .._internal import Registry
from ._math import LOG_2PI, log1mexp, log_sigmoid

link_registry: Registry = Registry("link")


class Link(eqx.Module):
    """Abstract link. Subclasses implement ``inverse``, ``__call__`` and ``mu_eta``.

    The log-scale helpers default to the naive forms; links override them
    where a stable form exists.
    """

    name: ClassVar[str]

    @abc.abstractmethod
    def inverse(self, eta):
        """``mu = g^{-1}(eta)``."""

    @abc.abstractmethod
    def __call__(self, mu):
        """``eta = g(mu)``."""

    @abc.abstractmethod
    def mu_eta(self, eta):
        """``d mu / d eta``."""

    def log_inverse(self, eta):
        """``log(mu)``."""
        return jnp.log(self.inverse(eta))

    def log1m_inverse(self, eta):
        """``log(1 - mu)`` (for links onto (0, 1))."""
        return jnp.log1p(-self.inverse(eta))

    def logit_inverse(self, eta):
        """``logit(mu)`` (for links onto (0, 1))."""
        return self.log_inverse(eta) - self.log1m_inverse(eta)

    def __repr__(self):
        return f"{type(self).__name__}()"


@link_registry.register("identity")
@final
class IdentityLink(Link):
    """``mu = eta``."""

    name: ClassVar[str] = "identity"

    def inverse(self, eta):
        return eta

    def __call__(self, mu):
        return mu

    def mu_eta(self, eta):
        return jnp.ones_like(eta)


@link_registry.register("log")
@final
class LogLink(Link):
    """``mu = exp(eta)``; ``log(mu) = eta`` exactly."""

    name: ClassVar[str] = "log"

    def inverse(self, eta):
        return jnp.exp(eta)

    def __call__(self, mu):
        return jnp.log(mu)

    def mu_eta(self, eta):
        return jnp.exp(eta)

    def log_inverse(self, eta):
        return eta

    def log1m_inverse(self, eta):
        return log1mexp(eta)


@link_registry.register("logit")
@final
class LogitLink(Link):
    """``mu = 1 / (1 + exp(-eta))``; ``logit(mu) = eta`` exactly."""

    name: ClassVar[str] = "logit"

    def inverse(self, eta):
        return jax.nn.sigmoid(eta)

    def __call__(self, mu):
        return jnp.log(mu) - jnp.log1p(-mu)

    def mu_eta(self, eta):
        return jnp.exp(log_sigmoid(eta) + log_sigmoid(-eta))

    def log_inverse(self, eta):
        return log_sigmoid(eta)

    def log1m_inverse(self, eta):
        return log_sigmoid(-eta)

    def logit_inverse(self, eta):
        return eta


@link_registry.register("probit")
@final
class ProbitLink(Link):
    """``mu = Phi(eta)`` (standard normal cdf), evaluated with ``log_ndtr`` in both tails."""

    name: ClassVar[str] = "probit"

    def inverse(self, eta):
        return ndtr(eta)

    def __call__(self, mu):
        return ndtri(mu)

    def mu_eta(self, eta):
        return jnp.exp(-0.5 * eta * eta - 0.5 * LOG_2PI)

    def log_inverse(self, eta):
        return log_ndtr(eta)

    def log1m_inverse(self, eta):
        return log_ndtr(-eta)


@link_registry.register("cloglog")
@final
class CloglogLink(Link):
    """``mu = 1 - exp(-exp(eta))``; ``logit(mu) = log(expm1(exp(eta)))`` as in glmmTMB."""

    name: ClassVar[str] = "cloglog"

    def inverse(self, eta):
        return -jnp.expm1(-jnp.exp(eta))

    def __call__(self, mu):
        return jnp.log(-jnp.log1p(-mu))

    def mu_eta(self, eta):
        return jnp.exp(eta - jnp.exp(eta))

    def log_inverse(self, eta):
        return log1mexp(-jnp.exp(eta))

    def log1m_inverse(self, eta):
        return -jnp.exp(eta)


@link_registry.register("inverse")
@final
class InverseLink(Link):
    """``mu = 1 / eta`` (R's ``Gamma`` default)."""

    name: ClassVar[str] = "inverse"

    def inverse(self, eta):
        return 1.0 / eta

    def __call__(self, mu):
        return 1.0 / mu

    def mu_eta(self, eta):
        return -1.0 / (eta * eta)

    def log_inverse(self, eta):
        return -jnp.log(eta)


@link_registry.register("sqrt")
@final
class SqrtLink(Link):
    """``mu = eta^2``."""

    name: ClassVar[str] = "sqrt"

    def inverse(self, eta):
        return eta * eta

    def __call__(self, mu):
        return jnp.sqrt(mu)

    def mu_eta(self, eta):
        return 2.0 * eta

    def log_inverse(self, eta):
        return 2.0 * jnp.log(jnp.abs(eta))


def get_link(link) -> Link:
    """A ``Link`` from a name (``"log"``) or a ``Link`` instance (returned unchanged)."""
    if isinstance(link, Link):
        return link
    if isinstance(link, str):
        return link_registry[link]()
    raise TypeError(f"A link must be a name such as 'log' or a Link instance; got {link!r}.")
