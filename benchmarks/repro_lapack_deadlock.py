"""Minimal reproduction (no tmbx) of a jaxlib 0.10.x CPU deadlock.

    python benchmarks/repro_lapack_deadlock.py            # hangs on a 2-core machine
    XLA_FLAGS=--xla_cpu_enable_concurrency_optimized_scheduler=false \
        python benchmarks/repro_lapack_deadlock.py        # completes

Several independent batched triangular solves in one jitted program. Each
LAPACK FFI call (``lapack_dtrsm_ffi``) runs on a thread of XLA:CPU's intra-op
pool and splits its batch with ``jax::ParallelBatchMap`` onto that same pool,
then blocks in ``BlockingCounter::Wait``. Once every pool thread is blocked
this way, no thread is left to run the pieces: the process sleeps at 0% CPU
forever (gdb: both ``tf_XLAEigen`` threads in ``ParallelBatchMap``).
tmbx's arrow layout (``vmap(solve_triangular)`` over the head blocks) hits it
in ``bench_scale.py b_lg``. The script exits with status 3 if an iteration
takes longer than ``TIMEOUT`` seconds (default 30).
"""

import os
import sys
import threading
import time

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsl

jax.config.update("jax_enable_x64", True)

M, K, C = 50_000, int(os.environ.get("K", "1")), 10
BRANCHES = int(os.environ.get("NB", "4"))
TIMEOUT = float(os.environ.get("TIMEOUT", "30"))
tri = jax.vmap(lambda L, b: jsl.solve_triangular(L, b, lower=True))


@jax.jit
def f(L, B):
    out = 0.0
    for j in range(BRANCHES):  # independent branches: XLA may run their trsm's concurrently
        out = out + tri(jnp.exp(L * (1.0 + 0.1 * j)) + 1.0, jnp.sin(B * (j + 1))).sum()
    return out


def main():
    print(f"jax {jax.__version__}, {os.cpu_count()} cpus, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}",
          flush=True)
    last = [time.monotonic()]

    def watchdog():
        while True:
            time.sleep(1)
            if time.monotonic() - last[0] > TIMEOUT:
                print(f"DEADLOCK: no progress for {TIMEOUT:.0f} s", flush=True)
                os._exit(3)

    threading.Thread(target=watchdog, daemon=True).start()
    L = jnp.tril(jnp.ones((M, K, K))) * 0.1
    B = jnp.ones((M, K, C))
    for i in range(100):
        f(L, B + i).block_until_ready()
        last[0] = time.monotonic()
    print("completed 100 iterations", flush=True)


if __name__ == "__main__":
    sys.exit(main())
