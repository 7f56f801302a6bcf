"""A persistent cache of traced programs, beside JAX's cache of compiled ones.

JAX's persistent compilation cache spares a fresh process XLA's compile time,
but not the tracing that comes first: to find the compiled program in the
cache, JAX traces the Python function and lowers it to StableHLO again. For a
Laplace fit that is most of a first fit's time once the cache is warm (a
1e5-row Poisson GLMM: about 1.1 s of tracing before a 0.45 s run).

A model whose program is fully determined by a key that is cheap to compute
(`tmbx.glmm`: its arguments, the data frame's contents, tmbx's source and the
JAX installation, `spec_digest`) can skip the trace: the first process stores
the lowered program with `jax.export`, and later ones read it back and hand it
to XLA, whose own cache then supplies the compiled executable. JAX offers the
two halves (export/deserialize and the compilation cache) but nothing that
keys a traced program on what produced it, which only the caller knows; this
module is that glue.

Loading the compiled executable from JAX's cache still costs a fresh process
about 0.2 s for a fit program (XLA rebuilds the program's module and buffer
assignment), whatever its size. `prefetch` starts that in a background thread
as soon as the call's key is known, before the design matrices are built, so
the two overlap; the file names begin with the key for it to find them.

Programs live in ``<JAX cache dir>/tmbx-programs``; the least recently used go once
they hold more than `MAX_BYTES`. ``TMBX_PROGRAM_CACHE=0`` turns the cache off
(and ``TMBX_NO_CACHE`` turns off both caches).
"""

from __future__ import annotations

import collections
import functools
import glob
import hashlib
import json
import logging
import os
import sys
import tempfile
import threading

import jax
import numpy as np

from ._internal import sharded

log = logging.getLogger(__name__)

#: the program directory's size limit; the least recently used go first
MAX_BYTES = 2 * 1024**3
#: programs larger than this (constants of a multi-million-row design) are not
#: stored: reading them back costs about what tracing does
MAX_PROGRAM_BYTES = 256 * 1024**2
#: arguments larger than this predict such a program (its constants grow with
#: the rows as the data do): not even exported, which would cost seconds
MAX_ARGUMENT_BYTES = 256 * 1024**2


class Unkeyable(Exception):
    """A value `spec_digest` cannot fingerprint (a user's function, say)."""


def _base():
    base = jax.config.jax_compilation_cache_dir
    return None if not base else os.path.join(base, "tmbx-programs")


def _directory():
    if os.environ.get("TMBX_PROGRAM_CACHE", "1") in ("0", "false", "False"):
        return None
    return _base()


def environment_digest() -> str:
    """What besides a model's own specification shapes its traced program:
    tmbx's source, the JAX installation and devices (`_installation_digest`),
    and the settings that tmbx reads, read at each call (a process may change
    ``TMBX_FAST_COMPILE`` between fits, and with it the fit's program)."""
    env = sorted((k, v) for k, v in os.environ.items() if k.startswith("TMBX_") or k == "XLA_FLAGS")
    return hashlib.sha256(f"{_installation_digest()}|{env!r}|{jax.config.jax_enable_x64}".encode()).hexdigest()


@functools.lru_cache(maxsize=1)
def _installation_digest() -> str:
    """tmbx's source (every module of the package and its plug-in libraries), the
    Python, JAX and jaxlib versions and the devices: fixed for a process."""
    import jaxlib

    import tmbx

    h = hashlib.sha256()
    roots = sorted({os.path.dirname(m.__file__) for m in (tmbx, tmbx.families, tmbx.covstructs)})
    for root in roots:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(filenames):
                if name.endswith(".py"):
                    path = os.path.join(dirpath, name)
                    h.update(os.path.relpath(path, root).encode())
                    with open(path, "rb") as f:
                        h.update(f.read())
    h.update(repr((sys.version, jax.__version__, jaxlib.__version__, jax.default_backend(),
                   [str(d) for d in jax.devices()])).encode())
    return h.hexdigest()


def _update(h, v) -> None:
    """Feed ``v`` into the hash ``h``: plain values by repr, arrays and data
    frames by their bytes, tmbx's own family and structure objects by repr (their
    fields are their whole definition); anything else raises `Unkeyable`."""
    import pandas as pd

    if v is None or isinstance(v, (bool, int, float, complex, str, bytes)):
        h.update(f"{type(v).__name__}:{v!r};".encode())
    elif isinstance(v, (list, tuple)):
        h.update(f"{type(v).__name__}[{len(v)}](".encode())
        for item in v:
            _update(h, item)
        h.update(b")")
    elif isinstance(v, dict):
        h.update(f"dict[{len(v)}](".encode())
        for k in sorted(v, key=repr):
            _update(h, k)
            _update(h, v[k])
        h.update(b")")
    elif isinstance(v, pd.DataFrame):
        h.update(f"DataFrame{v.shape}".encode())
        for name in v.columns:
            _update(h, str(name))
            _update(h, v[name])
        _update(h, v.index)
    elif isinstance(v, (pd.Series, pd.Index)):
        dtype = v.dtype
        h.update(f"{type(v).__name__}:{dtype}:{len(v)};".encode())
        if isinstance(dtype, pd.CategoricalDtype):
            # level order decides the design's columns; the codes, the values
            _update(h, pd.Series(dtype.categories.astype(str)))
            _update(h, bool(dtype.ordered))
            h.update(np.ascontiguousarray(v.cat.codes if isinstance(v, pd.Series) else v.codes).tobytes())
        elif dtype.kind in "biufcMm":
            h.update(np.ascontiguousarray(v.to_numpy()).tobytes())
        else:  # strings, mixed objects: pandas' own value hash
            h.update(pd.util.hash_pandas_object(pd.Series(np.asarray(v)), index=False).to_numpy().tobytes())
    elif isinstance(v, np.ndarray):
        if v.dtype.kind not in "biufc":
            _update(h, pd.Series(v.ravel()))
        else:
            h.update(f"ndarray:{v.dtype}:{v.shape};".encode())
            h.update(np.ascontiguousarray(v).tobytes())
    elif isinstance(v, np.generic):
        _update(h, v.item())
    elif type(v).__module__.startswith(("tmbx.", "families.", "covstructs.")):
        h.update(f"{type(v).__module__}.{type(v).__qualname__}:{v!r};".encode())
    else:
        raise Unkeyable(type(v).__name__)


def spec_digest(spec) -> str | None:
    """A fingerprint of ``spec`` (a model's whole specification, data included)
    and of `environment_digest`; None when ``spec`` holds something that cannot
    be fingerprinted, and then the model's programs are traced as usual."""
    h = hashlib.sha256(environment_digest().encode())
    try:
        _update(h, spec)
    except Exception:  # noqa: BLE001 - Unkeyable, or a column pandas cannot hash: no cache
        return None
    return h.hexdigest()


def template_digest(f, args, spec) -> str | None:
    """A fingerprint of a user's template ``f(*args)`` (`tmbx.Model`'s nll over
    the flat fixed and latent vectors and the data), of ``spec`` (the rest of the
    model's specification) and of `environment_digest`; None where it cannot be
    fingerprinted, and then the model's programs are traced as usual.

    A Python function has no fingerprint of its own (its bytecode misses the
    globals and the functions it calls), but what it computes at given shapes
    does: its jaxpr, traced here with the data as arguments (milliseconds), plus
    the values of the constants it closes over and of the data (the sparsity
    pattern is read off the template with the data in place). Two parts of a
    jaxpr print as names only: a derivative rule of ``jax.custom_jvp`` /
    ``custom_vjp`` and a host callback. Rules written inside JAX or tmbx are
    fixed by `environment_digest`; a template with any other (its own rule, a
    callback) gets no key."""
    try:
        closed = jax.make_jaxpr(f)(*args)
        if not _fixed_rules(closed.jaxpr):
            return None
        h = hashlib.sha256(environment_digest().encode())
        h.update(str(closed.jaxpr).encode())
        leaves, tree = jax.tree_util.tree_flatten(args)
        _update(h, [str(tree)] + [np.asarray(c) for c in closed.consts] + [np.asarray(a) for a in leaves])
        _update(h, spec)
    except Exception:  # noqa: BLE001 - Unkeyable, or a template that does not trace: no cache
        return None
    return h.hexdigest()


def _fixed_rules(jaxpr) -> bool:
    """Whether every custom derivative rule in ``jaxpr`` (and its sub-jaxprs) was
    written in JAX's or tmbx's own source, and no host callback is called."""
    from jax.extend.core import ClosedJaxpr, jaxprs_in_params

    import tmbx

    roots = tuple(os.path.dirname(m.__file__) + os.sep for m in (jax, tmbx, tmbx.families, tmbx.covstructs))
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if "callback" in name:
            return False
        if name.startswith("custom_"):
            for v in eqn.params.values():
                info = None if isinstance(v, ClosedJaxpr) else getattr(v, "debug_info", None)
                if info is not None:  # a rule (``lu.WrappedFun``): where it was written
                    src = getattr(info, "func_src_info", None) or ""
                    if not any(r in src for r in roots):
                        return False
                elif callable(v) and not getattr(v, "__module__", "").startswith(("jax.", "tmbx.")):
                    return False
        for sub in jaxprs_in_params(eqn.params):
            if not _fixed_rules(sub):
                return False
    return True


def read_object(key: str | None, name: str) -> dict | None:
    """The arrays `write_object` stored under the key ``key`` (a
    `template_digest`), or None (no key, no cache directory, nothing stored, an
    unreadable file)."""
    path = _object_path(key, name)
    if path is None or not os.path.exists(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            out = {k: z[k] for k in z.files}
        os.utime(path)  # recently used: evicted last (`_evict`)
        return out
    except Exception as e:  # noqa: BLE001 - a damaged entry: computed again
        log.info("tmbx program cache: unreadable %s (%s)", path, e)
        return None


def write_object(key: str | None, name: str, arrays: dict) -> None:
    """Store the NumPy ``arrays`` (a dict) under ``key`` for `read_object`."""
    path = _object_path(key, name)
    if path is not None:
        _write_atomic(path, lambda f: np.savez(f, **arrays))


def _write_atomic(path: str, write) -> None:
    """``write(file)`` into a temporary file renamed to ``path`` (a concurrent
    reader sees all of it or nothing), then `_evict`; a failure (disk full, a
    read-only directory) is logged: the entry is computed again next time."""
    directory, tmp = os.path.dirname(path), None
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
        _evict(directory)
    except Exception as e:  # noqa: BLE001
        log.info("tmbx program cache: %s not written (%s)", path, e)
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)


def _object_path(key, name):
    directory = _directory()
    if directory is None or key is None:
        return None
    return os.path.join(directory, f"{key[:KEY_CHARS]}-{name}.npz")


def _signature(args) -> str:
    leaves, tree = jax.tree_util.tree_flatten(args)
    if sum(int(getattr(x, "nbytes", 0)) for x in leaves) > MAX_ARGUMENT_BYTES:
        raise Unkeyable("arguments too large")
    parts = [str(tree)]
    for x in leaves:
        if sharded(x):
            raise Unkeyable("sharded argument")
        parts.append(f"{np.shape(x)}:{getattr(x, 'dtype', type(x).__name__)}:{getattr(x, 'weak_type', '')}")
    return ";".join(parts)


def _evict(directory: str) -> None:
    try:
        entries = [os.path.join(directory, f) for f in os.listdir(directory) if f.endswith((".exported", ".npz"))]
        stats = sorted(((os.stat(p).st_mtime, os.stat(p).st_size, p) for p in entries))
    except OSError:
        return
    total = sum(s for _, s, _ in stats)
    for _, size, path in stats:
        if total <= MAX_BYTES:
            break
        try:
            os.remove(path)
            total -= size
            os.remove(path + ".json")
        except OSError:
            pass


#: KEY_CHARS characters of the call's key begin its programs' file names
KEY_CHARS = 32


class _Prefetch:
    """One program being read and loaded in the background (`prefetch`)."""

    def __init__(self, path):
        self.path = path
        self.done = threading.Event()
        self.jitted = self.lowered = self.fast = self.marker = None


_PREFETCH: dict[str, _Prefetch] = {}
_TIER: dict[int, tuple] = {}  # id(lowered) -> (lowered, its tier marker, its first-tier executable)
_PREFETCH_LOCK = threading.Lock()


def prefetch(key: str | None) -> None:
    """Start reading and loading, in background threads, the programs stored
    under the call key ``key`` (a `spec_digest`), for `ProgramCache` to pick up.
    Nothing happens for a key with no stored programs."""
    directory = _directory()
    if directory is None or key is None:
        return
    for path in glob.glob(os.path.join(directory, f"{key[:KEY_CHARS]}-*.exported")):
        pid = os.path.basename(path)[KEY_CHARS + 1:-len(".exported")]
        with _PREFETCH_LOCK:
            if path in _PREFETCH or pid in _LIVE or ("shared", pid) in _LIVE:
                continue  # loading, or compiled in this process already
            entry = _PREFETCH[path] = _Prefetch(path)
        # not a daemon: shutdown waits for XLA instead of tearing it down mid-load
        threading.Thread(target=_load, args=(entry,), name="tmbx-prefetch").start()


def _load(entry: _Prefetch) -> None:
    """Deserialize a stored program, lower it at its argument shapes and compile
    it: XLA's persistent cache supplies the executable, which the lowering keeps
    (``Lowered.compile()`` caches it). A program that `tmbx._tiered` would run at
    its first tier first (never optimized before) gets that tier's executable."""
    from jax import export

    from ._tiered import optimized_before

    try:
        with open(entry.path + ".json") as f:
            meta = json.load(f)
        with open(entry.path, "rb") as f:
            exp = export.deserialize(bytearray(f.read()))
        specs = [jax.ShapeDtypeStruct(a.shape, a.dtype, weak_type=a.weak_type) for a in exp.in_avals]
        args, kwargs = jax.tree_util.tree_unflatten(exp.in_tree, specs)
        jitted = jax.jit(exp.call, compiler_options=meta.get("options"))
        lowered = jitted.lower(*args, **kwargs)
        fast = meta.get("fast")
        if fast is not None:  # `tmbx._tiered`'s choice, made here once
            entry.marker = optimized_before(lowered)
        if fast is not None and not entry.marker[1]:
            entry.fast = lowered.compile(compiler_options=fast)
        else:
            lowered.compile()
        entry.jitted, entry.lowered = jitted, lowered
    except Exception as e:  # noqa: BLE001 - the caller reads and compiles as usual
        log.info("tmbx program cache: prefetch of %s failed (%s)", entry.path, e)
    finally:
        entry.done.set()


def _take_prefetched(path: str) -> _Prefetch | None:
    with _PREFETCH_LOCK:
        entry = _PREFETCH.pop(path, None)
    if entry is None:
        return None
    entry.done.wait()
    if entry.lowered is None:
        return None
    if entry.marker is not None:
        _TIER[id(entry.lowered)] = (entry.lowered, entry.marker, entry.fast)
    return entry


def _discard_prefetch(path) -> None:
    if path is not None:
        with _PREFETCH_LOCK:
            _PREFETCH.pop(path, None)


def prefetched_tier(lowered):
    """``(marker, first-tier executable or None)`` that `prefetch` found for a
    tiered program's ``lowered`` (`tmbx._tiered.optimized_before`'s answer, so
    that it is not computed twice), or None."""
    held, marker, fast = _TIER.pop(id(lowered), (None, None, None))
    return (marker, fast) if held is lowered else None


#: programs of this process by `ProgramCache.program_id`, the most recently used
#: last: a second `tmbx.glmm` call with the same arguments and data (a notebook
#: cell run again) runs the first call's compiled programs, without tracing,
#: loading or compiling; a program's callable may hold its first model's data
#: alive, hence the bound
_LIVE: collections.OrderedDict = collections.OrderedDict()
LIVE_PROGRAMS = 16


def _live_get(pid):
    with _PREFETCH_LOCK:
        call = _LIVE.get(pid)
        if call is not None:
            _LIVE.move_to_end(pid)
        return call


def _live_put(pid, call) -> None:
    with _PREFETCH_LOCK:
        _LIVE[pid] = call
        _LIVE.move_to_end(pid)
        while len(_LIVE) > LIVE_PROGRAMS:
            _LIVE.popitem(last=False)


def shared(pid, make):
    """The process's object for program ``pid`` (None: not shared), made by
    ``make()`` the first time (`tmbx._tiered` keeps its compiled tiers so)."""
    if pid is None:
        return make()
    obj = _live_get(("shared", pid))
    if obj is None:
        obj = make()
        _live_put(("shared", pid), obj)
    return obj


class _Prefetched:
    """A prefetched program as `ProgramCache` hands it out: ``lower`` gives the
    prefetched lowering (its arguments' shapes are in the file's key), a call
    runs its compiled executable."""

    def __init__(self, entry: _Prefetch):
        self._jitted, self._lowered, self._compiled = entry.jitted, entry.lowered, None

    def lower(self, *args):
        return self._lowered

    def __call__(self, *args):
        if self._compiled is None:
            self._compiled = self._lowered.compile()
        try:
            return self._compiled(*args)
        except (TypeError, ValueError):  # arguments placed unlike the lowering's: jit decides
            return self._jitted(*args)


class ProgramCache:
    """``jax.jit(fn)`` whose traced program is stored on disk under a key.

    ``key()`` is read at each call (the owner may set it after construction); a
    None key, or a failure to export (a host callback, a sharded argument),
    falls back to plain `jax.jit`. Calls with new argument shapes get programs
    of their own, as `jax.jit` gives them.
    """

    def __init__(self, fn, key, compiler_options=None, name="program", tiered=None):
        self._key = key
        self._options = compiler_options
        self._tiered = tiered  # the first tier's options, where `tmbx._tiered` compiles it
        self._name = name
        self._jit = jax.jit(fn, compiler_options=compiler_options)
        self._calls = {}
        self._lock = threading.Lock()

    def program_id(self, args) -> str | None:
        """What identifies this program at ``args``' shapes across models (the
        call key, the program's name and options, the arguments' signature), or
        None where the owner gave no key."""
        key = self._key()
        if key is None:
            return None
        try:
            sig = _signature(args)
        except Unkeyable:
            return None
        return hashlib.sha256(f"{key}|{self._name}|{self._options}|{sig}".encode()).hexdigest()

    def _path(self, pid):
        directory = _directory()
        if directory is None or pid is None:
            return None
        return os.path.join(directory, f"{self._key()[:KEY_CHARS]}-{pid}.exported")

    def _exported(self, path, args):
        """The program for ``args``: read from ``path``, else traced, exported and
        written there; None where export is not possible."""
        from jax import export

        if os.path.exists(path):
            try:
                with open(path, "rb") as f:
                    exp = export.deserialize(bytearray(f.read()))
                try:
                    os.utime(path)  # recently used: evicted last (`_evict`)
                except OSError:
                    pass
                return exp
            except Exception as e:  # noqa: BLE001 - a damaged entry: trace again
                log.info("tmbx program cache: unreadable %s (%s)", path, e)
        try:
            exp = export.export(self._jit)(*args)
            blob = exp.serialize()
        except Exception as e:  # noqa: BLE001 - not exportable: plain jit
            log.info("tmbx program cache: %s not exported (%s)", self._name, e)
            return None
        if len(blob) <= MAX_PROGRAM_BYTES:
            try:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path + ".json", "w") as f:  # what `prefetch` compiles it with
                    json.dump(dict(options=self._options, fast=self._tiered), f)
            except OSError as e:
                log.info("tmbx program cache: not written (%s)", e)
                return exp
            _write_atomic(path, lambda f: f.write(blob))
        return exp

    def _callable(self, args):
        pid = self.program_id(args)
        if pid is None:
            return self._jit
        call = self._calls.get(pid)
        if call is None:
            with self._lock:
                call = self._calls.get(pid)
                if call is None:
                    call = _live_get(pid)
                    if call is None:
                        call = self._new_callable(pid, args)
                    else:  # a load started before this program was found live: not needed
                        _discard_prefetch(self._path(pid))
                    self._calls[pid] = call
                    _live_put(pid, call)
        return call

    def _new_callable(self, pid, args):
        path = self._path(pid)
        if path is None:
            return self._jit
        entry = _take_prefetched(path)
        if entry is not None:
            return _Prefetched(entry)
        exp = self._exported(path, args)
        return self._jit if exp is None else jax.jit(exp.call, compiler_options=self._options)

    def lower(self, *args):
        return self._callable(args).lower(*args)

    def __call__(self, *args):
        return self._callable(args)(*args)
