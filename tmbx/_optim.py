"""Outer optimizer: BFGS written in JAX, so a whole fit jit-compiles and vmaps.

glmmTMB uses ``nlminb`` (a quasi-Newton trust-region method). We use BFGS
with a backtracking line search on the exact gradient, followed by a Newton
polish on a Hessian obtained by central differences of the exact gradient
(TMB's ``optimHess``). The function carries an auxiliary state (the warm
start of the inner Newton solve) from one evaluation to the next.

The loop is a state machine that evaluates the objective exactly once per
iteration (trial points of the line search, of the Hessian differences and
of the Newton polish all go through the same call). The Laplace objective is
a large program (an inner Newton solve with sparse factorizations and its
implicit derivative), so tracing it once instead of five times is what keeps
compilation short. Failures are returned as codes with full-sentence
messages, never raised inside the traced loop.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp

OUTER_OK = 0
OUTER_MAXITER = 1
OUTER_LINESEARCH = 2
OUTER_NONFINITE = 3

OUTER_MESSAGES = {
    OUTER_OK: "converged: the gradient is zero to tolerance",
    OUTER_MAXITER: (
        "the optimizer stopped at its iteration limit before the gradient vanished; "
        "try better start values, centring and scaling predictors, or more iterations"
    ),
    OUTER_LINESEARCH: (
        "the line search could not decrease the objective although the gradient is not "
        "zero: the objective may be flat or noisy there (a variance near zero, a "
        "correlation near +/-1, or an unidentifiable parameter)"
    ),
    OUTER_NONFINITE: (
        "the objective is not finite at the start values; check the start values and "
        "the template for log(0), exp overflow or parameters outside their support"
    ),
}

# phases of the state machine
_LINESEARCH, _HESSIAN, _NEWTON, _DONE = 0, 1, 2, 3


class BFGSOptions(eqx.Module):
    """Settings of the outer optimizer.

    ``gtol``: converged when ``max|g| <= gtol * max(1, |f|)``; ``max_step``: the
    largest change of any parameter in one iteration; ``max_evals``: objective
    evaluations in all; ``polish``: finish with a Newton step on a
    finite-difference Hessian of the exact gradient (step ``fd_step``).
    """

    max_evals: int = 1000
    gtol: float = 1e-8
    ftol: float = 1e-13
    max_step: float = 4.0
    max_halvings: int = 30
    polish: bool = True
    fd_step: float = 1e-4


def bfgs(value_and_grad, x0, aux0, data, options: BFGSOptions = BFGSOptions()):
    """Minimize ``f``; ``value_and_grad(x, aux, data) -> (f, g, aux_new)``.

    Returns a dict with ``x, f, g, aux, status, iterations, hessian`` (the
    finite-difference Hessian at ``x`` when polishing, else zeros).
    """
    n = x0.shape[0]
    eye = jnp.eye(n)
    f0, g0, aux0 = value_and_grad(x0, aux0, data)
    ok0 = jnp.isfinite(f0) & jnp.all(jnp.isfinite(g0))
    opt = options

    types = dict(a=jnp.float64, halvings=jnp.int32, first=jnp.bool_, nsmall=jnp.int32, nfail=jnp.int32,
                 k=jnp.int32, evals=jnp.int32, status=jnp.int32, phase=jnp.int32)

    def norm(st):
        return {k: (jnp.asarray(v, types[k]) if k in types else v) for k, v in st.items()}

    def small_grad(f, g):
        return jnp.max(jnp.abs(g), initial=0.0) <= opt.gtol * jnp.maximum(1.0, jnp.abs(f))

    def direction(Hinv, g, first):
        p = -Hinv @ g
        descent = jnp.dot(g, p) < 0
        p = jnp.where(descent, p, -g)
        limit = jnp.where(first, jnp.minimum(opt.max_step, 1.0), opt.max_step)
        pmax = jnp.max(jnp.abs(p), initial=0.0)
        return p * jnp.minimum(1.0, limit / jnp.maximum(pmax, 1e-300)), descent

    def fd_h(x):
        return opt.fd_step * jnp.maximum(1.0, jnp.abs(x))

    def start_hessian(st):
        h = fd_h(st["x"])
        return dict(st, phase=_HESSIAN, k=0, xt=st["x"] + h[0] * eye[0])

    def finish(st, status):
        st = dict(st, status=status)
        if opt.polish and n > 0:
            return start_hessian(st)
        return dict(st, phase=_DONE)

    def on_linesearch(st, ft, gt, auxt):
        x, f, g, p, a = st["x"], st["f"], st["g"], st["p"], st["a"]
        slope = jnp.dot(g, p)
        ok = jnp.isfinite(ft) & jnp.all(jnp.isfinite(gt)) & (ft <= f + 1e-4 * a * slope)

        def accept(st):
            s = st["xt"] - x
            y = gt - g
            sy = jnp.dot(s, y)
            Hinv = jnp.where(st["first"], eye * sy / jnp.maximum(jnp.dot(y, y), 1e-300), st["Hinv"])
            rho = 1.0 / jnp.where(sy > 0, sy, 1.0)
            V = eye - rho * jnp.outer(s, y)
            upd = sy > 1e-12 * jnp.linalg.norm(s) * jnp.linalg.norm(y)
            Hinv = jnp.where(upd, V @ Hinv @ V.T + rho * jnp.outer(s, s), Hinv)
            tiny = jnp.abs(f - ft) <= opt.ftol * jnp.maximum(1.0, jnp.abs(ft))
            nsmall = jnp.where(tiny, st["nsmall"] + 1, 0)
            st = dict(st, x=st["xt"], f=ft, g=gt, aux=auxt, Hinv=Hinv, first=False, nsmall=nsmall,
                      nfail=0)
            conv = small_grad(ft, gt) | (nsmall >= 3)
            pn, _ = direction(Hinv, gt, False)
            cont = dict(st, p=pn, a=1.0, halvings=0, xt=st["x"] + pn)
            return jax.lax.cond(conv, lambda s: norm(finish(s, 0)), lambda s: norm(cont), st)

        def backtrack(st):
            q = -slope * a * a / (2.0 * (ft - f - slope * a))
            a_new = jnp.where(jnp.isfinite(q) & jnp.isfinite(ft), jnp.clip(q, 0.1 * a, 0.5 * a), 0.25 * a)
            exhausted = st["halvings"] >= opt.max_halvings

            def restart(st):
                # line search failed: reset to steepest descent once, then give up
                gave_up = st["nfail"] >= 1
                pn, _ = direction(eye, g, True)
                st2 = dict(st, Hinv=eye, p=pn, a=1.0, halvings=0, xt=x + pn, nfail=st["nfail"] + 1,
                           first=True)
                return jax.lax.cond(gave_up, lambda s: norm(finish(s, 2 - 2 * small_grad(f, g * 1e-3))),
                                    lambda s: norm(st2), st)

            more = dict(st, a=a_new, halvings=st["halvings"] + 1, xt=x + a_new * p)
            return jax.lax.cond(exhausted, lambda s: norm(restart(s)), lambda s: norm(more), st)

        return jax.lax.cond(ok, lambda s: norm(accept(s)), lambda s: norm(backtrack(s)), st)

    def on_hessian(st, ft, gt, auxt):
        # trial points x + h_i e_i (k = 2i) and x - h_i e_i (k = 2i + 1)
        k = st["k"]
        i = k // 2
        h = fd_h(st["x"])
        plus = (k % 2) == 0
        G = st["G"].at[i].add(jnp.where(plus, gt, -gt) / (2.0 * h[i]))
        k = k + 1
        i2 = k // 2
        nxt = jnp.where((k % 2) == 0, 1.0, -1.0)
        xt = st["x"] + nxt * h[jnp.minimum(i2, n - 1)] * eye[jnp.minimum(i2, n - 1)]
        st = dict(st, G=G, k=k, xt=xt)

        def newton(st):
            H = 0.5 * (st["G"] + st["G"].T)
            L = jnp.linalg.cholesky(H)
            step = jax.scipy.linalg.cho_solve((L, True), st["g"])
            good = jnp.all(jnp.isfinite(step))
            return dict(st, H=H, phase=jnp.where(good, _NEWTON, _DONE),
                        xt=st["x"] - jnp.where(good, step, 0.0))

        return jax.lax.cond(k >= 2 * n, lambda s: norm(newton(s)), lambda s: norm(s), st)

    def on_newton(st, ft, gt, auxt):
        better = jnp.isfinite(ft) & (ft <= st["f"] + 1e-10 * jnp.maximum(1.0, jnp.abs(st["f"])))
        better = better & (jnp.max(jnp.abs(gt)) <= jnp.max(jnp.abs(st["g"])))
        sel = lambda a, b: jnp.where(better, a, b)
        status = jnp.where(better & small_grad(ft, gt), 0, st["status"])
        return dict(st, x=sel(st["xt"], st["x"]), f=sel(ft, st["f"]), g=sel(gt, st["g"]),
                    aux=jax.tree_util.tree_map(sel, auxt, st["aux"]), status=status, phase=_DONE)

    def cond(st):
        return (st["phase"] != _DONE) & (st["evals"] < opt.max_evals)

    def body(st):
        ft, gt, auxt = value_and_grad(st["xt"], st["aux"], data)
        st = dict(st, evals=st["evals"] + 1)
        branches = [on_linesearch, on_hessian, on_newton, lambda s, *a: s]
        return jax.lax.switch(st["phase"], [lambda *a, b=b: norm(b(*a)) for b in branches],
                              norm(st), ft, gt, auxt)

    p0, _ = direction(eye, g0, True)
    st = dict(
        x=x0, f=f0, g=g0, aux=aux0, Hinv=eye, p=p0, a=1.0, halvings=0, xt=x0 + p0, first=True,
        nsmall=0, nfail=0, k=0, G=jnp.zeros((n, n)), H=jnp.zeros((n, n)), evals=1,
        status=jnp.where(ok0, OUTER_MAXITER, OUTER_NONFINITE),
        phase=jnp.where(ok0, _LINESEARCH, _DONE),
    )
    st = norm(st)
    st = jax.lax.cond(ok0 & small_grad(f0, g0), lambda s: norm(finish(s, 0)), lambda s: s, st)
    st = jax.lax.while_loop(cond, body, st)
    return dict(x=st["x"], f=st["f"], g=st["g"], aux=st["aux"], status=st["status"],
                iterations=st["evals"], hessian=st["H"])
