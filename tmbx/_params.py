"""Parameter bookkeeping: named arrays <-> the fixed vector x and latent vector u.

TMB's ``map`` is supported as there: ``map[name]`` is an array of the
parameter's size whose entries are factor levels (any hashable); elements
sharing a level share one free value, and ``None``/``NaN`` elements stay at
their start values.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np


def _is_missing(v) -> bool:
    if v is None:
        return True
    try:
        return bool(np.isnan(v))
    except (TypeError, ValueError):
        return False


class ParamSpace:
    """Ordered named parameters split into fixed (x) and random (u) vectors."""

    def __init__(self, params: dict, random=(), map=None):
        if not isinstance(params, dict) or not params:
            raise TypeError(
                "params must be a non-empty dict mapping names to start values, e.g. "
                "{'beta': jnp.zeros(2), 'logsd': 0.0, 'u': jnp.zeros(q)}"
            )
        random = list(random or [])
        map = dict(map or {})
        for kind, names in (("random", random), ("map", list(map))):
            unknown = [n for n in names if n not in params]
            if unknown:
                raise ValueError(
                    f"{kind} names {unknown} are not parameters; the parameters are {list(params)}. "
                    f"Use the same names as in params."
                )
        self.names = list(params)
        self.shapes = {k: tuple(np.shape(v)) for k, v in params.items()}
        self.starts = {k: np.asarray(v, dtype=np.float64).reshape(-1) for k, v in params.items()}
        self.random = [n for n in self.names if n in random]
        self.fixed = [n for n in self.names if n not in random]
        self.index = {}  # name -> int array: position in x/u, -1 = held at start
        self.sizes = {"x": 0, "u": 0}
        self.labels = {"x": [], "u": []}
        self.first = {"x": [], "u": []}  # (name, flat element) that defines each free entry
        for name in self.names:
            vec = "u" if name in random else "x"
            size = self.starts[name].size
            if name in map:
                levels = np.asarray(map[name], dtype=object).reshape(-1)
                if levels.size != size:
                    raise ValueError(
                        f"map[{name!r}] has {levels.size} entries but parameter {name!r} has {size}; "
                        "give one factor level (or None to hold the start value) per element."
                    )
                idx = np.full(size, -1, np.int64)
                seen = {}
                for i, lev in enumerate(levels):
                    if _is_missing(lev):
                        continue
                    if lev not in seen:
                        seen[lev] = self.sizes[vec]
                        self.sizes[vec] += 1
                        self.labels[vec].append(name if size == 1 else f"{name}[{i}]")
                        self.first[vec].append((name, i))
                    idx[i] = seen[lev]
            else:
                idx = np.arange(self.sizes[vec], self.sizes[vec] + size)
                self.sizes[vec] += size
                # (comprehensions: a crossed design has 10^5-10^6 random effects)
                if len(self.shapes[name]) == 0:
                    self.labels[vec].append(name)
                else:
                    self.labels[vec].extend([f"{name}[{i}]" for i in range(size)])
                self.first[vec].extend(zip([name] * size, range(size)))
            self.index[name] = idx

    @property
    def n_x(self) -> int:
        return self.sizes["x"]

    @property
    def n_u(self) -> int:
        return self.sizes["u"]

    def start(self, vec: str) -> np.ndarray:
        out = np.empty(self.sizes[vec], np.float64)
        for name in (self.random if vec == "u" else self.fixed):
            idx = self.index[name]
            # each free entry takes the start value of its first element (``map`` levels)
            pos, first = np.unique(idx, return_index=True)
            keep = pos >= 0
            out[pos[keep]] = self.starts[name][first[keep]]
        return out

    def unflatten(self, x, u) -> dict:
        """Named parameters from the x and u vectors: NumPy arrays for NumPy inputs
        (post-fit code: no JAX operation, so nothing to compile), else JAX arrays."""
        xp = np if isinstance(x, np.ndarray) and isinstance(u, np.ndarray) else jnp
        out = {}
        for name in self.names:
            vec = u if name in self.random else x
            idx = self.index[name]
            start = xp.asarray(self.starts[name])
            if np.all(idx >= 0) and idx.size and np.array_equal(idx, np.arange(idx[0], idx[0] + idx.size)):
                val = vec[idx[0]: idx[0] + idx.size]
            elif np.all(idx < 0):
                val = start
            else:
                safe = np.maximum(idx, 0)
                val = xp.where(xp.asarray(idx >= 0), vec[safe], start)
            out[name] = val.reshape(self.shapes[name])
        return out

    def flatten(self, p: dict, vec: str) -> np.ndarray:
        names = self.random if vec == "u" else self.fixed
        out = np.zeros(self.sizes[vec])
        for name in names:
            arr = np.asarray(p[name], dtype=np.float64).reshape(-1)
            idx = self.index[name]
            out[idx[idx >= 0]] = arr[idx >= 0]
        return out

    def expand(self, vec_values: np.ndarray, vec: str, fill=np.nan) -> dict:
        """Map a vector over x (or u) to named arrays; held elements get ``fill``."""
        names = self.random if vec == "u" else self.fixed
        out = {}
        for name in names:
            idx = self.index[name]
            arr = np.where(idx >= 0, np.asarray(vec_values)[np.maximum(idx, 0)] if len(vec_values) else fill, fill)
            out[name] = arr.reshape(self.shapes[name]) if self.shapes[name] else float(arr[0]) if arr.size else fill
        return out

    def n_total(self) -> int:
        return sum(math.prod(s) for s in self.shapes.values())
