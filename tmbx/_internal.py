"""Small helpers shared by the core and the plug-in libraries.

families/ and covstructs/ reach these by relative import
(``from .._internal import Registry``), never through a top-level package.
"""

from __future__ import annotations

import difflib
import functools
import gc
import threading
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


def unique_sorted(x):
    """``np.unique(x)`` (sorted distinct values of a 1-d array) by sorting.

    NumPy 2.x answers a plain ``np.unique`` with a hash table that is tens of
    times slower than sorting on millions of int64 keys (3.5 s against 0.05 s for
    3.5 million), and pattern keys of large designs are exactly that.
    """
    import numpy as np

    s = np.sort(np.asarray(x).reshape(-1))
    if s.size == 0:
        return s
    keep = np.empty(s.size, bool)
    keep[0] = True
    np.not_equal(s[1:], s[:-1], out=keep[1:])
    return s[keep]


def to_device(a, dtype=None):
    """``jnp.asarray(a, dtype)`` for host data, without compiling anything.

    In JAX 0.10 ``jnp.asarray`` of a NumPy array runs a small jitted program,
    compiled once per shape and dtype (about 20 ms each); a model's setup
    converts dozens of arrays of distinct shapes, which added up to a second of a
    small model's first fit. ``jax.device_put`` of the NumPy array does the same
    transfer with no compilation. Tracers and JAX arrays go through ``jnp.asarray``.
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    if isinstance(a, (jax.Array, jax.core.Tracer)):
        return jnp.asarray(a, dtype)
    return jax.device_put(np.asarray(a, dtype))


@functools.cache
def _method_program():
    import equinox as eqx

    from ._config import small_program_options

    # `eqx.filter_jit`: the module's arrays are traced and its other fields (a
    # user's structure may keep its order as a plain int) are static. These
    # programs run once on a few numbers: compiled for speed of compiling.
    return eqx.filter_jit(lambda obj, args, method: getattr(obj, method)(*args),
                          compiler_options=small_program_options())


def eval_method(obj, method, *args):
    """``getattr(obj, method)(*args)`` for an equinox module (a covariance structure,
    a family, a link) and concrete inputs, run as one compiled program, results as
    NumPy. Run op by op, each operation's first use compiles its own program
    (about 20 ms each, dozens for a structure's factor); jitted here, the program
    is compiled once per module type, method and argument shapes, and reused by
    every later call in the process. Python numbers among ``args`` are traced
    (as NumPy scalars), not compiled in."""
    import jax
    import numpy as np

    args = tuple(np.asarray(a) if isinstance(a, (bool, int, float)) else a for a in args)
    return jax.tree_util.tree_map(np.asarray, _method_program()(obj, args, method))


#: the cyclic garbage collector's first threshold while `gc_deferred` holds (Python's: 700)
GC_DEFERRED_THRESHOLD = 100_000
_gc_lock = threading.Lock()
_gc_depth = 0
_gc_saved = None


def gc_deferred(fn):
    """``fn`` run with Python's cyclic garbage collector's first threshold raised
    to `GC_DEFERRED_THRESHOLD` (restored after; nested and concurrent calls share
    one raise).

    Tracing a fit program allocates hundreds of thousands of tracers, equations
    and abstract values that live until the trace ends, and each young-generation
    collection walks them again: on 2 cores a quarter of the tracing of a
    1e5-row Poisson GLMM's fit program (0.63 s to 0.46 s) and a fifth of Owls'
    zero-inflated nbinom1 model's. Reference counting still frees everything
    acyclic at once; the cycles JAX's traces leave are collected once the
    threshold is back. A process that turned the collector off keeps it off."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        global _gc_depth, _gc_saved
        with _gc_lock:
            if _gc_depth == 0:
                _gc_saved = gc.get_threshold()
                gc.set_threshold(max(_gc_saved[0], GC_DEFERRED_THRESHOLD), *_gc_saved[1:])
            _gc_depth += 1
        try:
            return fn(*args, **kwargs)
        finally:
            with _gc_lock:
                _gc_depth -= 1
                if _gc_depth == 0:
                    gc.set_threshold(*_gc_saved)

    return wrapper


def sharded(a) -> bool:
    """Whether the array ``a`` is split over several devices."""
    return len(getattr(getattr(a, "sharding", None), "device_set", ())) > 1


def batched_like(tree, ref):
    """``tree`` with every leaf tied to ``ref``'s value (unchanged), so that under
    `jax.vmap` each leaf is batched exactly when ``ref`` is.

    A `jax.lax.while_loop` under ``vmap`` finds which carries are batched by
    re-batching its body until that set stops growing, and a carry that starts as
    a constant (an iteration counter, a flag) but is updated from batched values
    costs one more pass. Our loops' bodies hold a whole Laplace evaluation, and
    each pass re-traces it (a third of a second for a small model's profile
    solver). Starting every carry batched leaves one pass.
    """
    import jax
    import jax.numpy as jnp

    r = jnp.ravel(ref)[:1]
    off = jnp.any(jnp.isnan(r)) & False  # False, but computed from ref

    def tie(a):
        a = jnp.asarray(a)
        if a.dtype == jnp.bool_:
            return a | off
        return a + off.astype(a.dtype)

    return jax.tree_util.tree_map(tie, tree)
