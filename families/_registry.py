"""Family registry: glmmTMB's names -> constructors, and ``get()``."""

from __future__ import annotations

import re

from .._internal import Registry
from ._base import Family
from ._bell import Bell
from ._beta import Beta
from ._betabinomial import BetaBinomial
from ._binomial import Binomial
from ._compois import ConwayMaxwellPoisson
from ._gamma import Gamma
from ._gaussian import Gaussian
from ._genpois import GeneralizedPoisson
from ._lognormal import LogNormal
from ._negbin import NegativeBinomial1, NegativeBinomial2, NegativeBinomial12
from ._ordbeta import OrderedBeta
from ._poisson import Poisson
from ._skewnormal import SkewNormal
from ._student_t import StudentT
from ._truncated import Truncated
from ._tweedie import Tweedie

registry: Registry = Registry("family")
"""glmmTMB family name -> constructor ``f(link=None) -> Family``."""

for _names, _cls in [
    (("gaussian",), Gaussian),
    (("poisson",), Poisson),
    (("binomial",), Binomial),
    (("Gamma", "ziGamma"), Gamma),
    (("beta_family", "beta"), Beta),
    (("betabinomial",), BetaBinomial),
    (("nbinom1",), NegativeBinomial1),
    (("nbinom2",), NegativeBinomial2),
    (("nbinom12",), NegativeBinomial12),
    (("genpois",), GeneralizedPoisson),
    (("compois",), ConwayMaxwellPoisson),
    (("tweedie",), Tweedie),
    (("lognormal",), LogNormal),
    (("t_family", "t"), StudentT),
    (("skewnormal",), SkewNormal),
    (("ordbeta",), OrderedBeta),
    (("bell",), Bell),
]:
    registry.register(*_names)(_cls)


def _truncated(cls):
    def make(link=None):
        return Truncated(cls(link))

    make.__name__ = make.__qualname__ = f"truncated_{cls.name}"
    make.__doc__ = f"Zero-truncated {cls.name}: ``Truncated({cls.__name__}(link))``."
    return make


for _cls in (Poisson, NegativeBinomial1, NegativeBinomial2, GeneralizedPoisson, ConwayMaxwellPoisson):
    registry.add(f"truncated_{_cls.name}", _truncated(_cls))

_CALL = re.compile(r"^\s*([A-Za-z_.][\w.]*)\s*(?:\((.*)\))?\s*$", re.S)
_ARG = re.compile(r"""^\s*(?:(\w+)\s*=\s*)?(?:"([^"]*)"|'([^']*)'|([\w.]+))\s*$""")


def _parse(spec: str) -> tuple[str, str | None]:
    """``"Gamma(link = 'log')"`` -> ``("Gamma", "log")``; ``"poisson"`` -> ``("poisson", None)``."""
    m = _CALL.match(spec)
    if not m:
        raise ValueError(
            f"Cannot read the family {spec!r}; write a glmmTMB family such as "
            "'nbinom2', 'Gamma(link = \"log\")' or 'binomial(link = \"probit\")'."
        )
    name, args = m.group(1), m.group(2)
    link = None
    for part in filter(None, (a.strip() for a in (args or "").split(","))):
        a = _ARG.match(part)
        if not a or (a.group(1) not in (None, "link")):
            raise ValueError(
                f"Cannot read the argument {part!r} in the family {spec!r}; only the link is "
                "supported, e.g. link = \"log\"."
            )
        link = a.group(2) if a.group(2) is not None else a.group(3) if a.group(3) is not None else a.group(4)
    return name, link


def get(family, link=None) -> Family:
    """A family object from a glmmTMB name, an R-style call string, a class, or an object.

    ``get("nbinom2")``, ``get("truncated_nbinom2")``, ``get("Gamma(link='log')")``,
    ``get("binomial", link="probit")``, ``get(Poisson)``; a ``Family`` instance is
    returned unchanged (``link``, if given, must agree). Unknown names raise a
    ``ValueError`` listing close matches.
    """
    if isinstance(family, Family):
        if link is not None and getattr(link, "name", link) != family.link.name:
            raise ValueError(
                f"get() got the family object {family!r} and link={link!r}; "
                f"set the link when constructing the family, e.g. {type(family).__name__}(link={link!r})."
            )
        return family
    if isinstance(family, type) and issubclass(family, Family):
        return family(link)
    if not isinstance(family, str):
        raise TypeError(f"A family is a name such as 'nbinom2' or a Family object; got {family!r}.")
    name, spec_link = _parse(family)
    if link is not None and spec_link is not None and getattr(link, "name", link) != spec_link:
        raise ValueError(f"The family {family!r} names link {spec_link!r} but link={link!r} was also given.")
    return registry[name](link if link is not None else spec_link)
