"""Response families for tmbx (imported as ``tmbx.families``): glmmTMB 1.1.5's families.

Every family is a small frozen ``equinox.Module`` with the same methods
(``log_prob``, ``mean``, ``variance``, ``sample``, ``cdf``,
``deviance_residuals``, ``check_support``, ``sigma``) taking the same keyword
arguments (``eta``, ``disp``, ``psi``, ``zi``, ``trials``); see ``Family``.
Zero inflation, zero truncation and hurdles wrap any suitable base family.

>>> import tmbx.families as fam
>>> fam.get("nbinom2")
NegativeBinomial2(link=LogLink())
>>> fam.ZeroInflated(fam.Poisson())          # doctest: +SKIP
"""

from ._base import Family
from ._bell import Bell
from ._beta import Beta
from ._betabinomial import BetaBinomial
from ._binomial import Binomial
from ._compois import ConwayMaxwellPoisson
from ._gamma import Gamma
from ._gaussian import Gaussian
from ._genpois import GeneralizedPoisson
from ._links import (
    CloglogLink,
    IdentityLink,
    InverseLink,
    Link,
    LogitLink,
    LogLink,
    ProbitLink,
    SqrtLink,
    get_link,
    link_registry,
)
from ._lognormal import LogNormal
from ._negbin import NegativeBinomial1, NegativeBinomial2, NegativeBinomial12
from ._ordbeta import OrderedBeta
from ._poisson import Poisson
from ._registry import get, registry
from ._skewnormal import SkewNormal
from ._student_t import StudentT
from ._truncated import Hurdle, Truncated
from ._tweedie import Tweedie
from ._zero_inflated import ZeroInflated

__all__ = [
    "Family",
    "Link",
    "IdentityLink",
    "LogLink",
    "LogitLink",
    "ProbitLink",
    "CloglogLink",
    "InverseLink",
    "SqrtLink",
    "get_link",
    "link_registry",
    "Gaussian",
    "Poisson",
    "Binomial",
    "BetaBinomial",
    "Gamma",
    "Beta",
    "OrderedBeta",
    "NegativeBinomial1",
    "NegativeBinomial2",
    "NegativeBinomial12",
    "GeneralizedPoisson",
    "ConwayMaxwellPoisson",
    "Tweedie",
    "LogNormal",
    "StudentT",
    "SkewNormal",
    "Bell",
    "ZeroInflated",
    "Truncated",
    "Hurdle",
    "registry",
    "get",
]
