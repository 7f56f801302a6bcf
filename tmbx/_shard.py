"""Rows of a model's data split across devices (``jax.sharding``).

A template's data are a pytree whose row-indexed leaves (response, design
matrices, group indices, weights) share one leading dimension, the number of
rows. `shard_rows` places those leaves split by rows over a one-axis device mesh
and replicates the rest (parameters' start values never enter). Nothing else
changes: every compiled program of the fit takes its inputs' shardings, XLA's
SPMD partitioner runs the row-wise work (linear predictors, densities and their
derivatives) on each device's rows, and the reductions over rows (the
negative log-likelihood, its gradient, the latent Hessian's ``J' W J``
assembled by scatter-adds) become local sums followed by collective sums
(all-reduce). Results equal one device's up to the order of floating-point
sums.

``NamedSharding`` needs the rows to split evenly; `shard_rows` refuses a
split that does not, and `split_devices` picks the largest number of the given
devices that divides the rows (what ``tmbx.glmm(devices=...)`` uses).
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def _device_list(devices):
    if devices is None:
        return list(jax.devices())
    if isinstance(devices, int):
        avail = jax.devices()
        if devices < 1 or devices > len(avail):
            raise ValueError(f"devices={devices}: this process has {len(avail)} device(s) ({avail[0].platform}); "
                             "on a CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N set before "
                             "JAX starts gives N host devices")
        return list(avail[:devices])
    out = list(devices) if not isinstance(devices, str) else [devices]
    if not out:
        raise ValueError("devices is empty")
    bad = [d for d in out if not isinstance(d, jax.Device)]
    if bad:
        raise TypeError(f"devices must be a number of devices or a list of JAX devices (jax.devices()), "
                        f"got {bad[0]!r}")
    return out


def split_devices(n_rows: int, devices=None) -> list:
    """The first ``k`` of ``devices`` (default: all), ``k`` the largest count that
    divides ``n_rows`` evenly."""
    devs = _device_list(devices)
    k = max(d for d in range(1, len(devs) + 1) if n_rows % d == 0)
    return devs[:k]


def shard_rows(data, n_rows: int, devices=None):
    """``data`` with every array whose leading dimension is ``n_rows`` split by rows
    across ``devices`` (default: all of JAX's devices; an int: the first that
    many), the other arrays replicated on them.

    >>> data = tmbx.shard_rows(data, len(y), devices=4)
    >>> model = tmbx.Model(nll, params, data=data, random=["u"])

    The rows must split evenly: pad them (rows with weight zero in the template)
    or pass fewer devices (`split_devices` finds how many)."""
    devs = _device_list(devices)
    if n_rows % len(devs):
        raise ValueError(
            f"{n_rows} rows do not split evenly over {len(devs)} devices; pad the data to a multiple of "
            f"{len(devs)} rows (rows with weight zero), or use {len(split_devices(n_rows, devs))} of the devices "
            "(tmbx.split_devices)")
    mesh = Mesh(np.array(devs), ("rows",))
    by_rows = NamedSharding(mesh, PartitionSpec("rows"))
    replicated = NamedSharding(mesh, PartitionSpec())

    def put(a):
        if a is None:
            return None
        a = a if isinstance(a, jax.Array) else np.asarray(a)
        rows = a.ndim >= 1 and a.shape[0] == n_rows
        return jax.device_put(a, by_rows if rows else replicated)

    return jax.tree_util.tree_map(put, data)
