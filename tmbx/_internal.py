"""Small helpers shared by the core and the plug-in libraries.

families/ and covstructs/ reach these by relative import
(``from .._internal import Registry``), never through a top-level package.
"""

from __future__ import annotations

import difflib
from typing import Callable, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """A name -> class table with aliases and helpful errors.

    ``kind`` is what the registry holds ("family", "covariance structure"),
    used in error messages.
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._table: dict[str, T] = {}

    def register(self, *names: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            for name in names:
                self._table[name] = obj
            return obj

        return deco

    def add(self, name: str, obj: T) -> None:
        self._table[name] = obj

    def __contains__(self, name: str) -> bool:
        return name in self._table

    def __getitem__(self, name: str) -> T:
        try:
            return self._table[name]
        except KeyError:
            close = difflib.get_close_matches(name, list(self._table), n=3)
            hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
            raise ValueError(
                f"Unknown {self.kind} {name!r}.{hint} Known: {', '.join(sorted(self._table))}."
            ) from None

    def names(self) -> list[str]:
        return sorted(self._table)

    def items(self):
        return self._table.items()


class LazyModule:
    """A module imported on first attribute access (for heavy imports such as
    scipy.stats or asdex, which cost most of a second at ``import tmbx``)."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr):
        import importlib

        return getattr(importlib.import_module(self._name), attr)
