"""Time the jitted pieces of one Laplace evaluation of a `tmbx.Model`.

Used by the benchmarks' ``--profile`` flags. Every piece is jitted on its
own; we report its compile time (first call minus a steady call) and the
median of a few steady calls, at the fixed parameters ``x`` and latent
effects ``u`` given (typically the optimum, so the inner Newton solve
converges in one or two steps when warm-started there).

This reaches into the engine's internals (``model.laplace``, ``model._vg``);
it is a diagnostic, not an API.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp


def _time(fn, *args, reps=3):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - t
    runs = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        runs.append(time.perf_counter() - t)
    run = statistics.median(runs)
    return dict(first_s=first, run_s=run, compile_s=max(first - run, 0.0))


def profile_model(model, x, u, reps=3) -> dict:
    lap = model.laplace
    d = model.data
    x = jnp.asarray(x)
    u = jnp.asarray(u)
    u0 = jnp.asarray(model.space.start("u"))
    out = {}
    out["joint_nll"] = _time(jax.jit(model.f), x, u, d, reps=reps)
    out["grad_u"] = _time(jax.jit(lap.grad_u), x, u, d, reps=reps)
    out["hessian_values"] = _time(jax.jit(lap.hessian), x, u, d, reps=reps)
    flat = jax.jit(lap.hessian)(x, u, d)
    pad = jnp.asarray(lap._pad)
    fac = jax.jit(lambda fl: lap.layout.factor((fl + pad)[:-1]))
    out["factor"] = _time(fac, flat, reps=reps)
    F = fac(flat)
    b = jnp.ones(lap.n_u)
    out["solve"] = _time(jax.jit(lambda F, b: F.solve(b)), F, b, reps=reps)
    out["logdet_grad"] = _time(jax.jit(jax.grad(lambda fl: lap.layout.factor((fl + pad)[:-1]).logdet())),
                               flat, reps=reps)
    newton = jax.jit(lambda x, u0, d: lap.newton(x, u0, d))
    out["newton_cold"] = _time(newton, x, u0, d, reps=reps)
    out["newton_cold"]["iterations"] = int(newton(x, u0, d)[2])
    out["newton_warm"] = _time(newton, x, u, d, reps=reps)
    out["newton_warm"]["iterations"] = int(newton(x, u, d)[2])
    val = jax.jit(lambda x, u0, d: lap.objective(x, u0, d)[0])
    out["value_only_warm"] = _time(val, x, u, d, reps=reps)
    vg = jax.jit(model._vg)
    out["value_and_grad_warm"] = _time(vg, x, u, d, reps=reps)
    out["value_and_grad_cold"] = _time(vg, x, u0, d, reps=reps)
    return out


def print_profile(prof: dict, title: str = "") -> None:
    if title:
        print(title)
    print(f"  {'piece':<22} {'compile s':>10} {'run ms':>10}  note")
    for k, v in prof.items():
        note = f"{v['iterations']} Newton iterations" if "iterations" in v else ""
        print(f"  {k:<22} {v['compile_s']:10.2f} {1e3 * v['run_s']:10.2f}  {note}")
