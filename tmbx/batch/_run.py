"""Running buckets of members: chunks of ``batch_size``, a device, a cluster.

A bucket is a set of members that share one compiled program: the
template's design (sent once), and per member the rows it copies, its
responses, their counts and its start values. A chunk of members is one
call of ``jit(vmap(fit))``; every chunk of a bucket has the same shape (the
last is padded by repeating a member), so a bucket compiles once. The same
function fits a chunk in this process or on a Dask/Ray worker, which
rebuilds (and caches) the bucket's model from its spec.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import hashlib
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from .._hessian import LatentGaussianHessian
from .._internal import to_device
from ._layout import LevelBlockHessian, stacked_data

# factor from a member's data size to the memory its fit needs (Hessian
# pieces, per-observation curvatures, line-search copies of the state)
_MEMORY_FACTOR = 40
# On CPU a chunk costs its size times its slowest member's evaluations (a vmapped
# while loop runs until every member is done), so small chunks waste less; below
# a few thousand rows per chunk the loop's per-iteration overhead starts to show.
# 2,000 genes (NB2, 40-1,700 merged rows each), repeated call on 2 cores: chunks of
# up to 512 members 14.4 s, 48 12.5 s, 16 10.5 s, 8 10.3 s.
_CPU_CHUNK_ROWS = 2048
_CPU_BATCH = (8, 128)
_MODELS: dict = {}  # token -> (model, program): one per bucket and process


@dataclasses.dataclass
class BucketSpec:
    """What a process needs to build a bucket's model: the canonical design and
    the family (the template is rebuilt from them, compiled once per process).

    ``token`` names the compiled program: two buckets with the same formula,
    family, array shapes and random-effect index structure share it, so a
    second `glmm_batch` call on same-shaped data compiles nothing."""

    design: object
    family: object
    template_kw: dict
    blocks: tuple | None = None  # (M, R) of a canonical layout: the latent Hessian by level blocks
    token: str = ""

    def __post_init__(self):
        if not self.token:
            self.token = structural_token(self.design, self.family, self.template_kw, self.blocks)


def structural_token(design, family, template_kw, blocks=None) -> str:
    """A digest of everything a compiled fit depends on besides the data's values."""
    h = hashlib.sha1()
    h.update(repr((repr(family), sorted(template_kw.items()), design.trials is None, blocks)).encode())
    for key, c in sorted(design.components.items()):
        h.update(repr((key, c.formula, c.names, c.X.shape)).encode())
        for t in c.re:
            h.update(repr((t.group, t.terms, t.structure, sorted(t.args), t.Z.shape, len(t.levels))).encode())
            h.update(np.ascontiguousarray(t.index).tobytes())
    return h.hexdigest()


@dataclasses.dataclass
class Bucket:
    """Members that share one compiled program (arrays with a leading member axis)."""

    spec: BucketSpec
    source: object  # the design the member rows index into
    rows: np.ndarray  # (B, N)
    y: np.ndarray  # (B, N)
    count: np.ndarray  # (B, N)
    x0: np.ndarray  # (B, n_x)
    keys: list
    pooled: np.ndarray | None = None  # (n_x,) entries started from the first chunk's estimates

    def __len__(self):
        return len(self.keys)

    def pilot(self, res: dict):
        """Start the later chunks' variance and dispersion parameters at the median
        estimate of the first chunk's converged members (members of one model
        share their scale), which saves BFGS iterations; fixed effects keep their
        own starts."""
        ok = (res["status"] == 0) & np.isfinite(res["f"])
        if self.pooled is None or not self.pooled.any() or ok.sum() < 3:
            return
        med = np.median(res["x"][ok][:, self.pooled], axis=0)
        self.x0 = self.x0.copy()
        self.x0[:, self.pooled] = med


def bucket_model(spec: BucketSpec):
    """The bucket's template and its compiled ``jit(vmap(fit))`` (cached per process)."""
    if spec.token not in _MODELS:
        from ..formula._template import build_template

        tmpl = build_template(spec.design, spec.family, **spec.template_kw)
        lap = tmpl.model.laplace
        if (spec.blocks is not None and lap is not None and isinstance(lap.hessian, LatentGaussianHessian)
                and lap.hessian.blocks is None):
            lap.hessian = LevelBlockHessian(lap.hessian, *spec.blocks)
        _MODELS[spec.token] = (tmpl, None)
    return _MODELS[spec.token]


def _program(spec: BucketSpec, axes):
    tmpl, prog = bucket_model(spec)
    if prog is None:
        model = tmpl.model
        u0 = jnp.asarray(model.space.start("u"))
        prog = jax.jit(jax.vmap(lambda x0, d: model._fit_impl(x0, u0, d), in_axes=(0, axes)),
                       compiler_options=model.fit_options())
        _MODELS[spec.token] = (tmpl, prog)
    return tmpl, prog


def fit_chunk(spec: BucketSpec, source, rows, y, count, x0, device=None) -> dict:
    """Fit one chunk of members; numpy results with a leading member axis."""
    tmpl, _ = bucket_model(spec)
    data, axes = stacked_data(source, rows, y, count, tmpl.model.data)
    _, prog = _program(spec, axes)
    with jax.default_device(device) if device is not None else contextlib.nullcontext():
        # device_put, not jnp.asarray: in JAX 0.10 the latter compiles a small program
        # per shape, and every bucket brings new shapes
        data = jax.tree_util.tree_map(to_device, data)
        res = prog(to_device(x0), data)
    return jax.tree_util.tree_map(np.asarray, res)


# ----------------------------------------------------------------------- devices
def resolve_device(device):
    """``None``, "cpu", "gpu"/"cuda", or a ``jax.Device`` -> a jax.Device or None."""
    if device is None or isinstance(device, jax.Device):
        return device
    if isinstance(device, str):
        kind = {"cuda": "gpu"}.get(device.lower(), device.lower())
        try:
            return jax.devices(kind)[0]
        except RuntimeError as err:
            raise ValueError(f"device={device!r}: no such JAX device here ({err}); available: "
                             f"{[d.platform for d in jax.devices()]}") from None
    raise TypeError(f"device must be None, 'cpu', 'gpu' or a jax.Device, got {type(device).__name__}")


def available_memory(device=None) -> float:
    """Free bytes on the device (accelerators) or in host RAM (CPU)."""
    dev = device or jax.devices()[0]
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    if stats and "bytes_limit" in stats:
        return float(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    try:
        import psutil

        return float(psutil.virtual_memory().available)
    except ImportError:
        return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def default_batch_size(bucket: Bucket, device=None) -> int:
    """Members per compiled call: a quarter of the free memory over the estimated
    per-member footprint (its data times a factor, plus its Hessians)."""
    N = bucket.rows.shape[1]
    p = sum(c.X.shape[1] + 2 + sum(t.Z.shape[1] for t in c.re) for c in bucket.source.components.values())
    n_x = bucket.x0.shape[1]
    tmpl, _ = bucket_model(bucket.spec)
    n_u = tmpl.model.space.n_u
    per_member = 8.0 * (_MEMORY_FACTOR * N * (p + 4) + 20 * n_u * n_u + 10 * n_x * n_x)
    size = int(0.25 * available_memory(device) // per_member)
    dev = device or jax.devices()[0]
    if dev.platform == "cpu":
        lo, hi = _CPU_BATCH
        size = min(size, max(lo, min(hi, _CPU_CHUNK_ROWS // N)))
        # one chunk per core at least: chunks run in parallel threads
        size = min(size, -(-len(bucket) // _cpu_threads()))
    return max(1, min(size, len(bucket)))


def _cpu_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


# ----------------------------------------------------------------------- running
def chunks(n: int, size: int):
    """(start, stop) of each chunk, and the index array padded to ``size``."""
    for start in range(0, n, size):
        idx = np.arange(start, min(start + size, n))
        yield idx, np.concatenate([idx, np.full(size - len(idx), idx[0])])


def run_buckets(buckets, batch_size=None, device=None, backend=None, progress=True):
    """Fit every bucket; returns one result dict (numpy, leading member axis) per bucket."""
    device = resolve_device(device)
    if batch_size is not None and (not isinstance(batch_size, (int, np.integer)) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer or None, got {batch_size!r}")
    sizes = [batch_size or default_batch_size(b, device) for b in buckets]
    sizes = [min(s, len(b)) for s, b in zip(sizes, buckets)]
    total = sum(math.ceil(len(b) / s) for b, s in zip(buckets, sizes))
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc="glmm_batch", unit="batch", disable=not progress, leave=False)
    try:
        if backend is None:
            out = [_run_local(b, s, device, bar) for b, s in zip(buckets, sizes)]
        else:
            from ._cluster import run_cluster

            out = run_cluster(buckets, sizes, backend, bar)
    finally:
        bar.close()
    return out


def _run_local(bucket: Bucket, size: int, device, bar) -> dict:
    """Chunks one after another; on CPU, after the first (which compiles), in
    parallel threads: XLA runs a small vmapped fit on one core."""
    def one(ch):
        idx, padded = ch
        res = fit_chunk(bucket.spec, bucket.source, bucket.rows[padded], bucket.y[padded],
                        bucket.count[padded], bucket.x0[padded], device)
        bar.update(1)
        return {k: v[: len(idx)] for k, v in res.items()}

    todo = list(chunks(len(bucket), size))
    parts = [one(todo[0])]
    bucket.pilot(parts[0])
    threads = _cpu_threads() if (device or jax.devices()[0]).platform == "cpu" else 1
    if threads > 1 and len(todo) > 1:
        with concurrent.futures.ThreadPoolExecutor(min(threads, len(todo) - 1)) as pool:
            parts += list(pool.map(one, todo[1:]))
    else:
        parts += [one(ch) for ch in todo[1:]]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
