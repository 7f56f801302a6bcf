"""The name -> class table of covariance structures, and ``get``."""

from __future__ import annotations

from .._internal import Registry
from ._base import CovStruct

registry: Registry = Registry("covariance structure")


def register(*names: str):
    """Class decorator: make a CovStruct subclass available under ``names``.

    Works for user-defined structures too::

        @tmbx.covstructs.register("myspline")
        class MySpline(tmbx.covstructs.CovStruct): ...
    """

    def deco(cls):
        if not (isinstance(cls, type) and issubclass(cls, CovStruct)):
            raise TypeError(f"Only CovStruct subclasses can be registered; got {cls!r}.")
        return registry.register(*names)(cls)

    return deco


def get(name_or_obj, dim=None, **kwargs) -> CovStruct:
    """A covariance structure from a glmmTMB name, a class, or an instance.

    ``get("us", dim=3)``, ``get("exp", dim=k, coords=xy)``,
    ``get("ou", dim=k, times=t)``, ``get("rr", dim=k, d=2)``,
    ``get("propto", dim=k, matrix=M)``; a ``CovStruct`` subclass is
    instantiated with the same arguments, an instance is returned as is
    (after checking ``dim``).
    """
    if isinstance(name_or_obj, CovStruct):
        if dim is not None and dim != name_or_obj.dim:
            raise ValueError(
                f"get: the structure {type(name_or_obj).__name__} has dim={name_or_obj.dim}, "
                f"but dim={dim} was asked for."
            )
        if kwargs:
            raise TypeError(f"get: extra arguments {sorted(kwargs)} do not apply to an instance.")
        return name_or_obj
    if isinstance(name_or_obj, type) and issubclass(name_or_obj, CovStruct):
        cls = name_or_obj
    elif isinstance(name_or_obj, str):
        cls = registry[name_or_obj]
    else:
        raise TypeError(
            "get: expected a covariance-structure name (e.g. 'us', 'ar1'), a CovStruct "
            f"subclass or instance; got {type(name_or_obj).__name__}."
        )
    return cls(dim=dim, **kwargs)


def available() -> list[str]:
    """The registered names."""
    return registry.names()
