"""Tiered compilation of a small model's fit: quick to compile first, fast to run later.

XLA:CPU spends most of a small model's compile time in LLVM's optimization of
the fit program. Compiled at backend optimization level 0 the first fit of a
Salamanders model is ready seconds sooner, but the program then runs two to
three times slower (topo_exp: 0.47 s against 0.19 s per fit; salamanders_rr:
0.50 s against 0.20 s), which matters as soon as the model is fitted again
(``refit``, simulation studies). JIT compilers settle this with tiers, and so
do we:

- the first call compiles at level 0 and runs;
- once the program runs a second time and its runs take long enough for
  optimization to pay (`SLOW`), the fully optimized program is compiled in a
  background thread from the same lowering (no second trace);
- later calls run the level-0 program until the optimized one is ready, and
  the optimized one from then on (they never wait: `wait` does, for
  benchmarks that time the optimized program);
- the optimized program lands in JAX's persistent compilation cache, and a
  marker file beside it names the program's fingerprint, so a later process
  loads the optimized program directly for its first call.

A single fit never starts the optimized compile, only a refit does (a
simulation study, a bootstrap by refits). XLA holds a compile lock in
stretches of a compile, so whatever the user asks next compiles its own
programs in the gaps: started after the first fit of owls_zinb1, the
background compile made a fresh process's first ``ranef()`` 1.3 s instead of
1.0 s, ``predict(se_fit=True)`` 1.8 s instead of 1.1 s and ``simulate()`` 2.6 s
instead of 0.7 s (benchmarks/bench_methods.py), and the process's exit waited
for it.

No library provides this for `jax.jit`; it uses JAX's ahead-of-time API
(``lower`` once, ``compile`` twice).
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
import weakref

import jax

#: a first run slower than this (seconds) starts the optimized compile
SLOW = 0.1

_INSTANCES = weakref.WeakSet()


def _enabled() -> bool:
    """``TMBX_TIERED=0`` keeps every small model at level 0 (no background
    compiles: the test suite sets it, as they would only load its 2 cores)."""
    return os.environ.get("TMBX_TIERED", "1") not in ("0", "false", "False")


def _marker_dir():
    path = jax.config.jax_compilation_cache_dir
    return None if not path else os.path.join(path, "tmbx-optimized")


def _signature(args):
    leaves, tree = jax.tree_util.tree_flatten(args)
    return tree, tuple((getattr(x, "shape", ()), str(getattr(x, "dtype", type(x)))) for x in leaves)


def optimized_before(lowered):
    """(fingerprint, whether its optimized program was compiled before, in this or
    another process) for a lowered program; (None, False) without markers."""
    marks = _marker_dir() if _enabled() else None
    if marks is None:
        return None, False
    text = lowered.as_text()
    key = hashlib.sha256(f"{jax.__version__}|{jax.default_backend()}|{text}".encode()).hexdigest()
    return key, os.path.exists(os.path.join(marks, key))


class _Program:
    def __init__(self, lowered, fast_options):
        from ._programs import prefetched_tier

        self.lowered = lowered
        self.slow_runs = 0  # level-0 runs slower than `SLOW`
        pre = prefetched_tier(lowered)  # loaded in the background (`tmbx._programs.prefetch`)
        (self.key, before), fast = pre if pre is not None else (optimized_before(lowered), None)
        if before:
            # from the persistent cache (or already loaded by the prefetch)
            self.compiled, self.optimized, self.thread = lowered.compile(), True, None
            return
        self.compiled = fast if fast is not None else lowered.compile(compiler_options=fast_options)
        self.optimized, self.thread = False, None

    def start_optimizing(self):
        def work():
            try:
                full = self.lowered.compile()
            except Exception:  # noqa: BLE001 - keep the level-0 program
                return
            self.compiled, self.optimized = full, True
            marks = _marker_dir()
            if marks is not None and self.key is not None:
                try:
                    os.makedirs(marks, exist_ok=True)
                    open(os.path.join(marks, self.key), "w").close()
                except OSError:
                    pass

        # not a daemon: interpreter shutdown waits for XLA instead of tearing it down mid-compile
        self.thread = threading.Thread(target=work, name="tmbx-optimize")
        self.thread.start()


class TieredJit:
    """``jax.jit(fn)`` with tiered compilation (module docstring); ``fast_options``:
    the ``compiler_options`` of the first tier."""

    def __init__(self, fn, fast_options):
        # ``fn`` may come with its own ``lower`` (`tmbx._programs.ProgramCache`)
        self._jit = fn if hasattr(fn, "lower") else jax.jit(fn)
        self._fast = fast_options
        self._programs = {}
        self._lock = threading.Lock()
        _INSTANCES.add(self)

    def lower(self, *args):
        return self._jit.lower(*args)

    def __call__(self, *args):
        sig = _signature(args)
        prog = self._programs.get(sig)
        if prog is None:
            with self._lock:
                prog = self._programs.get(sig)
                if prog is None:
                    # a second model with the same program (`tmbx._programs.shared`)
                    # takes the first one's compiled tiers
                    from ._programs import shared

                    pid = self._jit.program_id(args) if hasattr(self._jit, "program_id") else None
                    prog = self._programs[sig] = shared(pid, lambda: _Program(self._jit.lower(*args), self._fast))
        if prog.optimized or prog.thread is not None:
            return prog.compiled(*args)  # swapped for the optimized program once it is ready
        t = time.perf_counter()
        out = jax.block_until_ready(prog.compiled(*args))
        if time.perf_counter() - t > SLOW:
            prog.slow_runs += 1
            if prog.slow_runs >= 2 and _enabled():  # run again: worth optimizing now
                prog.start_optimizing()
        return out

    def wait(self) -> float:
        """Block until every slow program's optimized compile has finished, starting
        those not started yet (tests, benchmarks that time the optimized program);
        returns the seconds waited."""
        t = time.perf_counter()
        for prog in list(self._programs.values()):
            if prog.thread is None and not prog.optimized and prog.slow_runs and _enabled():
                prog.start_optimizing()
            if prog.thread is not None:
                prog.thread.join()
        return time.perf_counter() - t


def wait_all() -> float:
    """`TieredJit.wait` for every tiered program of the process (benchmarks that
    time optimized programs); returns the seconds waited."""
    t = time.perf_counter()
    for jit in list(_INSTANCES):
        jit.wait()
    return time.perf_counter() - t
