"""Spreading chunks of members over a Dask or Ray cluster.

Each bucket's spec (canonical design, family) and its source design are sent
to the workers once (Dask ``scatter(broadcast=True)``, Ray ``put``); a task
carries only its members' row numbers, responses, counts and starts. A
worker builds the bucket's model on first use and keeps it (with its
compiled program) for the bucket's later tasks.
"""

from __future__ import annotations

import numpy as np

from ._run import chunks, fit_chunk


def run_cluster(buckets, sizes, backend, bar):
    if backend == "ray":
        return _run_ray(buckets, sizes, bar)
    if backend == "dask" or _is_dask_client(backend):
        return _run_dask(buckets, sizes, backend, bar)
    raise ValueError(f"backend must be None, 'dask', 'ray' or a dask.distributed.Client, got {backend!r}")


def _is_dask_client(obj) -> bool:
    try:
        from dask.distributed import Client
    except ImportError:
        return False
    return isinstance(obj, Client)


def _tasks(bucket, size):
    for idx, padded in chunks(len(bucket), size):
        yield idx, (bucket.rows[padded], bucket.y[padded], bucket.count[padded], bucket.x0[padded])


def _collect(buckets, parts):
    out = []
    for b, bparts in zip(buckets, parts):
        out.append({k: np.concatenate([r[k][: len(idx)] for idx, r in bparts]) for k in bparts[0][1]})
    return out


def _run_dask(buckets, sizes, backend, bar):
    try:
        from dask.distributed import Client, LocalCluster, as_completed, default_client
    except ImportError:
        raise ImportError("backend='dask' needs dask.distributed: pip install 'dask[distributed]'") from None
    own = None
    if _is_dask_client(backend):
        client = backend
    else:
        try:
            client = default_client()
        except ValueError:
            # no cluster running: a local one in this process (threads share the
            # compiled programs; start your own Client for processes or machines)
            own = client = Client(LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                               dashboard_address=None))
    try:
        futures, where = [], {}
        parts = [[] for _ in buckets]
        for i, (b, s) in enumerate(zip(buckets, sizes)):
            spec, source = client.scatter([b.spec, b.source], broadcast=True)
            tasks = list(_tasks(b, s))
            # the first chunk alone: its estimates start the others (Bucket.pilot)
            idx, args = tasks[0]
            first = client.submit(fit_chunk, spec, source, *args, pure=False).result()
            parts[i].append((idx, first))
            bar.update(1)
            b.pilot(first)
            for idx, args in list(_tasks(b, s))[1:]:
                f = client.submit(fit_chunk, spec, source, *args, pure=False)
                where[f.key] = (i, idx)
                futures.append(f)
        for f in as_completed(futures):
            i, idx = where[f.key]
            parts[i].append((idx, f.result()))
            bar.update(1)
        for p in parts:
            p.sort(key=lambda t: t[0][0])
        return _collect(buckets, parts)
    finally:
        if own is not None:
            cluster = own.cluster
            own.close()
            cluster.close()


def _run_ray(buckets, sizes, bar):
    try:
        import ray
    except ImportError:
        raise ImportError("backend='ray' needs Ray, which is not installed: pip install ray "
                          "(or use backend='dask', which runs a local cluster by default)") from None
    if not ray.is_initialized():
        ray.init()
    remote = ray.remote(fit_chunk)
    parts = [[] for _ in buckets]
    pending = {}
    for i, (b, s) in enumerate(zip(buckets, sizes)):
        spec, source = ray.put(b.spec), ray.put(b.source)
        idx, args = next(_tasks(b, s))
        first = ray.get(remote.remote(spec, source, *args))
        parts[i].append((idx, first))
        bar.update(1)
        b.pilot(first)
        for idx, args in list(_tasks(b, s))[1:]:
            pending[remote.remote(spec, source, *args)] = (i, idx)
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        i, idx = pending.pop(done[0])
        parts[i].append((idx, ray.get(done[0])))
        bar.update(1)
    for p in parts:
        p.sort(key=lambda t: t[0][0])
    return _collect(buckets, parts)
