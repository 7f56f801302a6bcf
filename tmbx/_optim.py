"""Outer optimizer: BFGS written in JAX, so a whole fit jit-compiles and vmaps.

glmmTMB uses ``nlminb`` (a quasi-Newton trust-region method). We use BFGS
with a backtracking line search on the exact gradient, followed by a Newton
polish on a Hessian obtained by central differences of the exact gradient
(TMB's ``optimHess``; forward differences where every evaluation is costly).
The function carries an auxiliary state (the warm start of the inner Newton
solve) from one evaluation to the next.

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

from ._internal import batched_like

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
_LINESEARCH, _HESSIAN, _NEWTON, _DONE, _INIT = 0, 1, 2, 3, 4


class BFGSOptions(eqx.Module):
    """Settings of the outer optimizer.

    ``gtol``: converged when ``max|g| <= gtol * max(1, |f|)``; ``max_step``: the
    largest change of any parameter in one iteration; ``max_evals``: objective
    evaluations in all; ``polish``: finish with a Newton step on a
    finite-difference Hessian of the exact gradient (step ``fd_step``);
    ``noise``: a line-search trial that fails by less than ``noise * max(1, |f|)``
    ends that search (the objective's rounding noise: an ill-conditioned Laplace
    objective near a boundary is noisy at about 1e-11 relative);
    ``jac_aux``: with ``polish``, also difference the first ``jac_aux`` entries of
    a 1-D ``aux`` at the same points (their Jacobian in x, ``aux_jacobian``);
    ``fd_forward``: forward differences ``(g(x + h e_i) - g(x)) / h`` (``n``
    gradients instead of ``2n``) for a model whose every evaluation is costly; with
    an exact gradient and a step ``fd_step`` of 1e-5 the truncation error
    (relative ``~h``) stays below central differences' rounding error at 1e-4;
    ``gain_tol``: a line search that gives up still counts as converged when a
    quasi-Newton step would gain less than this (``g' H^-1 g / 2``): the
    linear-cost path's objective is an estimate whose gradient is not exactly its
    derivative, so near the optimum no step can show a decrease;
    ``polish_skip``: the polishing Newton step is not evaluated (the search's
    point, gradient and finite-difference Hessian are returned) when it predicts
    a gain below ``polish_skip * max(1, |f|)``: a step of at most
    ``sqrt(2 polish_skip |f|)`` standard errors (5e-5 at ``|f|`` = 1e5), which
    the evaluation could not tell from the objective's rounding. It was one
    evaluation of every fit: 9 of the 1e5-row crossed Gaussian ladder's, 11 of
    TMB's ar1xar1 at 100 x 100.
    ``early_hessian``: the search goes to the finite-difference Hessian (with
    ``polish``) as soon as its next quasi-Newton step would gain less than
    ``early_hessian * max(1, |f|)``, instead of iterating until the gradient
    vanishes: the Newton step on that Hessian converges from there (the error
    squares), where quasi-Newton steps take a few more evaluations (ar1xar1 at
    100 x 100: 7 search evaluations become 4, for a Newton step's one). Where
    the Newton point's gradient is not zero to ``gtol`` (or the Hessian is not
    positive definite), the search resumes from the better point with the
    Hessian's inverse as its metric, and polishes again at its end; once per fit.
    The Hessian is then the switch point's, ``sqrt(2 early_hessian |f|)``
    standard errors from the optimum (at 1e-9: 0.01 at ``|f|`` = 1e5), which
    changes it by about as much as forward differences do (ar1xar1: 1e-5
    relative) but moves tiny p-values (a z of 6 by 1e-4 relative). Off by
    default; `outer_options` turns it on where every evaluation is costly.
    ``gauss_newton_start``: where the model predicts the inner mode, start BFGS
    from the diagonal of the Gauss-Newton curvature (`tmbx.Model._gauss_newton`,
    the ``curvature`` of `bfgs`); None: where the template declares its
    latent-Gaussian structure (the formula front end's models, templates given
    as `tmbx.LatentGaussian`), whose fixed parameters are mostly a linear
    predictor's coefficients, where that curvature is close. A general
    template's parameters may all be its latent field's (TMB's ar1xar1: two
    correlations), where the curvature misses the log-determinant's share:
    there it cost 2 of 9 evaluations, and it changed none on general Poisson and
    negative binomial GLMM templates.
    """

    max_evals: int = 1000
    gtol: float = 1e-8
    ftol: float = 1e-13
    max_step: float = 4.0
    max_halvings: int = 30
    polish: bool = True
    fd_step: float = 1e-4
    jac_aux: int = 0
    max_expand: int = 5
    noise: float = 1e-11
    gain_tol: float = 0.0
    polish_skip: float = 1e-14
    fd_forward: bool = False
    early_hessian: float = 0.0
    gauss_newton_start: bool | None = None


def bfgs(value_and_grad, x0, aux0, data, options: BFGSOptions = BFGSOptions(), max_evals=None,
         hinv0=None, curvature=None):
    """Minimize ``f``; ``value_and_grad(x, aux, data) -> (f, g, aux_new)``.

    Returns a dict with ``x, f, g, aux, status, iterations, hessian`` (the
    finite-difference Hessian at ``x`` when polishing, else zeros).
    ``max_evals`` (may be traced) overrides ``options.max_evals``: one compiled
    program then serves runs with different budgets. ``hinv0``: a starting inverse
    Hessian (e.g. a refit's, from the original fit: the first steps are then
    Newton steps rather than a scaled steepest descent); default the identity.
    ``curvature(x, aux, data) -> H``: an approximate Hessian at the first point,
    from that evaluation's ``aux`` (`Model._gauss_newton`); the inverse of its
    diagonal then starts the quasi-Newton updates in place of the identity (run
    once, under `jax.lax.cond`). On the 1e6-row Bernoulli ladder this takes the
    search from 21 evaluations to 12; on the random-slope Poisson one it costs 2.

    The body is branch-free (every update is computed and selected with
    ``where``): the state is small, and ``cond`` branches would each carry a
    copy of the state through XLA, which costs compile time, not run time.
    """
    n = x0.shape[0]
    if n == 0:
        # every fixed parameter held (``map``): nothing to optimize, one evaluation
        f, g, aux = value_and_grad(x0, aux0, data)
        status = jnp.where(jnp.isfinite(f), OUTER_OK, OUTER_NONFINITE)
        return dict(x=x0, f=f, g=g, aux=aux, status=status, iterations=jnp.asarray(1),
                    hessian=jnp.zeros((0, 0)))
    eye = jnp.eye(n)
    opt = options
    limit = opt.max_evals if max_evals is None else max_evals

    def small_grad(f, g):
        return jnp.max(jnp.abs(g), initial=0.0) <= opt.gtol * jnp.maximum(1.0, jnp.abs(f))

    def direction(Hinv, g, first):
        p = -Hinv @ g
        descent = jnp.dot(g, p) < 0
        p = jnp.where(descent, p, -g)
        limit = jnp.where(first, jnp.minimum(opt.max_step, 1.0), opt.max_step)
        pmax = jnp.max(jnp.abs(p), initial=0.0)
        return p * jnp.minimum(1.0, limit / jnp.maximum(pmax, 1e-300))

    def fd_h(x):
        return opt.fd_step * jnp.maximum(1.0, jnp.abs(x))

    # the Hessian phase's evaluations: k = 2i, 2i + 1 at x +/- h_i e_i (central),
    # k = i at x + h_i e_i (forward)
    forward = opt.fd_forward
    n_fd = n if forward else 2 * n

    def fd_point(x, k):
        if forward:
            return x + fd_h(x)[jnp.minimum(k, n - 1)] * eye[jnp.minimum(k, n - 1)]
        i = jnp.minimum(k // 2, n - 1)
        sign = jnp.where(k % 2 == 0, 1.0, -1.0)
        return x + sign * fd_h(x)[i] * eye[i]

    def fd_column(k, new, old, h):
        # this evaluation's share of column i of the derivative (``new`` at the
        # Hessian point, ``old`` at x)
        if forward:
            return (new - old) / h
        return jnp.where(k % 2 == 0, new, -new) / (2.0 * h)

    polish = opt.polish and n > 0

    def body(st):
        xt = st["xt"]
        ft, gt, auxt = value_and_grad(xt, st["aux"], data)
        finite_t = jnp.isfinite(ft) & jnp.all(jnp.isfinite(gt))
        phase = st["phase"]
        x, f, g, p, a, Hinv = st["x"], st["f"], st["g"], st["p"], st["a"], st["Hinv"]

        # ---- first evaluation (at x0): the objective appears once in the program
        ini = phase == _INIT
        if curvature is not None:
            # (``first`` stays: the first update rescales this metric as it does the
            # identity, by s'y / y'Hy)
            Hc, ok_c = jax.lax.cond(ini & finite_t, lambda: _diagonal_metric(curvature(xt, auxt, data)),
                                    lambda: (eye, jnp.asarray(False)))
            Hinv = jnp.where(ok_c, Hc, Hinv)
        p_ini = direction(Hinv, gt, st["first"])
        done_ini = ini & (~finite_t | small_grad(ft, gt))


        # ---- line search phase: Armijo backtracking, and expansion (step x4, at
        # most max_expand times) while the slope along p stays steep (the weak
        # Wolfe curvature condition fails). Without expansion a flat or concave
        # stretch gives s'y <= 0, the BFGS update is skipped and the same short
        # step repeats for dozens of iterations.
        slope = jnp.dot(g, p)
        armijo = finite_t & (ft <= f + 1e-4 * a * slope)
        ls = phase == _LINESEARCH
        expanding = st["nexp"] > 0
        improve = armijo & (~expanding | (ft < st["fb"]))
        steep = jnp.dot(gt, p) < 0.9 * slope
        # ... never past max_step in any coordinate: along a flat direction (a variance
        # running to 0) unbounded expansion jumps to where the objective is rounding noise
        room = 4.0 * a * jnp.max(jnp.abs(p), initial=0.0) <= opt.max_step
        expand = ls & improve & steep & (st["halvings"] == 0) & (st["nexp"] < opt.max_expand) & room
        use_best = ls & expanding & ~improve
        acc = ls & ((improve & ~expand) | use_best)
        # the accepted candidate: this point, or the best point of the expansion
        xc = jnp.where(use_best, st["xb"], xt)
        fc = jnp.where(use_best, st["fb"], ft)
        gc = jnp.where(use_best, st["gb"], gt)
        auxc = jax.tree_util.tree_map(lambda b, t: jnp.where(use_best, b, t), st["auxb"], auxt)
        s = xc - x
        y = gc - g
        sy = jnp.dot(s, y)
        H0 = jnp.where(st["first"], Hinv * sy / jnp.maximum(jnp.dot(y, Hinv @ y), 1e-300), Hinv)
        rho = 1.0 / jnp.where(sy > 0, sy, 1.0)
        V = eye - rho * jnp.outer(s, y)
        upd = sy > 1e-12 * jnp.linalg.norm(s) * jnp.linalg.norm(y)
        Hacc = jnp.where(upd, V @ H0 @ V.T + rho * jnp.outer(s, s), H0)
        tiny = jnp.abs(f - fc) <= opt.ftol * jnp.maximum(1.0, jnp.abs(fc))
        nsmall_acc = jnp.where(tiny, st["nsmall"] + 1, 0)
        conv_acc = small_grad(fc, gc) | (nsmall_acc >= 3)
        p_acc = direction(Hacc, gc, False)
        if polish and opt.early_hessian > 0:
            early = (acc & ~conv_acc & ~st["tried"]
                     & (0.5 * jnp.dot(gc, Hacc @ gc) <= opt.early_hessian * jnp.maximum(1.0, jnp.abs(fc))))
        else:
            early = jnp.asarray(False)
        # backtracking
        q = -slope * a * a / (2.0 * (ft - f - slope * a))
        a_bt = jnp.where(jnp.isfinite(q) & jnp.isfinite(ft), jnp.clip(q, 0.1 * a, 0.5 * a), 0.25 * a)
        # a failing trial within the objective's noise of f: halving the step cannot
        # show a decrease any more, so this direction is done (nlminb's relative
        # function convergence, at a tenth of its tolerance)
        at_noise = finite_t & (jnp.abs(ft - f) <= opt.noise * jnp.maximum(1.0, jnp.abs(f)))
        exhausted = (st["halvings"] >= opt.max_halvings) | at_noise
        gave_up = exhausted & (st["nfail"] >= 1)
        p_sd = direction(eye, g, True)

        # ---- Hessian phase: gradients at the points of `fd_point`
        hs = phase == _HESSIAN
        k = st["k"]
        i = jnp.minimum(k if forward else k // 2, n - 1)
        G = jnp.where(hs, st["G"].at[i].add(fd_column(k, gt, g, fd_h(x)[i])), st["G"])
        if opt.jac_aux:
            ca = fd_column(k, auxt[: opt.jac_aux], st["aux"][: opt.jac_aux], fd_h(x)[i])
            JA = jnp.where(hs, st["JA"].at[:, i].add(ca), st["JA"])
        else:
            JA = st["JA"]
        k_next = jnp.where(hs, k + 1, k)
        hs_done = hs & (k_next >= n_fd)
        Hfd = 0.5 * (G + G.T)
        L = jnp.linalg.cholesky(Hfd)
        step = jax.scipy.linalg.cho_solve((L, True), g)
        good_step = jnp.all(jnp.isfinite(step))

        # ---- Newton phase: accept the polished point if it is no worse
        nw = phase == _NEWTON
        better = finite_t & (ft <= f + 1e-10 * jnp.maximum(1.0, jnp.abs(f)))
        better = better & (jnp.max(jnp.abs(gt), initial=0.0) <= jnp.max(jnp.abs(g), initial=0.0))
        take = acc | (nw & better) | (ini & finite_t)

        # ---- next state
        finish_ok = acc & conv_acc
        fail_ls = ls & ~armijo & ~expanding
        finish_fail = fail_ls & gave_up
        to_hessian = ((finish_ok | finish_fail) & polish) | early
        status = jnp.where(finish_ok, OUTER_OK, st["status"])
        # (with curvature from BFGS updates: after a restart Hinv is the identity)
        small_gain = (0.5 * jnp.dot(g, Hinv @ g) <= opt.gain_tol) & ~st["first"]
        status = jnp.where(finish_fail, jnp.where(small_grad(f, g * 1e-3) | small_gain, OUTER_OK, OUTER_LINESEARCH),
                           status)
        status = jnp.where(nw & better & small_grad(ft, gt), OUTER_OK, status)
        # the polishing Newton step on the finite-difference Hessian predicts the gain
        gain = 0.5 * jnp.dot(g, step)
        status = jnp.where(hs_done & good_step & (gain <= opt.gain_tol), OUTER_OK, status)
        # (a positive definite finite-difference Hessian: ``good_step``)
        settled = hs_done & good_step & (gain <= opt.polish_skip * jnp.maximum(1.0, jnp.abs(f)))
        status = jnp.where(settled, OUTER_OK, status)
        status = jnp.where(ini, jnp.where(finite_t, jnp.where(done_ini, OUTER_OK, OUTER_MAXITER),
                                          OUTER_NONFINITE), status)
        to_hessian = to_hessian | (done_ini & finite_t & polish)
        new_x = jnp.where(acc, xc, jnp.where(take, xt, x))
        new_g = jnp.where(acc, gc, jnp.where(take, gt, g))
        # an early switch (``early_hessian``) whose Newton step did not converge, or
        # whose Hessian is not positive definite, resumes the search from the
        # better point: with the Hessian's inverse as its metric from a Newton
        # point that improved, with the search's own where the step failed (there
        # the differenced Hessian does not describe the objective over the step)
        early_on = st["early"]
        converged_nw = better & small_grad(ft, gt)
        resume = early_on & ((hs_done & ~good_step) | (nw & ~converged_nw))
        # (in the Newton phase ``L`` is still the differenced Hessian's factor: G is
        # reset only when a Hessian phase starts)
        Hinv_r = jnp.where(nw & better & good_step, jax.scipy.linalg.cho_solve((L, True), eye), Hinv)
        p_r = direction(Hinv_r, new_g, False)
        # (a Newton step that gained less than ``gain_tol`` set OK; the search goes on)
        status = jnp.where(resume, OUTER_MAXITER, status)
        phase_next = jnp.where(
            ini, jnp.where(done_ini, jnp.where(finite_t & polish, _HESSIAN, _DONE), _LINESEARCH),
            jnp.where(to_hessian, _HESSIAN,
            jnp.where(resume, _LINESEARCH,
            jnp.where((finish_ok | finish_fail) & (not polish), _DONE,
                      jnp.where(hs_done, jnp.where(good_step & ~settled, _NEWTON, _DONE),
                                jnp.where(nw, _DONE, phase))))))
        restart = fail_ls & exhausted & ~gave_up
        backtrack = fail_ls & ~exhausted
        a_next = jnp.where(acc | restart | resume, 1.0, jnp.where(backtrack, a_bt, jnp.where(expand, 4.0 * a, a)))
        p_next = jnp.where(ini, p_ini, jnp.where(resume, p_r, jnp.where(acc, p_acc, jnp.where(restart, p_sd, p))))
        xt_next = jnp.where(ini, jnp.where(done_ini, fd_point(xt, 0), xt + p_ini),
                  jnp.where(early, fd_point(xc, 0),
                  jnp.where(resume, new_x + p_r,
                  jnp.where(acc & ~conv_acc, xc + p_acc,
                   jnp.where(expand, x + 4.0 * a * p,
                   jnp.where(backtrack, x + a_bt * p,
                   jnp.where(restart, x + p_sd,
                   jnp.where(to_hessian, fd_point(new_x, 0),
                   jnp.where(hs & ~hs_done, fd_point(x, k_next),
                   jnp.where(hs_done, x - jnp.where(good_step, step, 0.0), xt))))))))))
        return dict(
            x=new_x, f=jnp.where(acc, fc, jnp.where(take, ft, f)), g=new_g,
            aux=jax.tree_util.tree_map(lambda c1, a1, a0: jnp.where(acc, c1, jnp.where(take, a1, a0)),
                                       auxc, auxt, st["aux"]),
            xb=jnp.where(expand, xt, st["xb"]), fb=jnp.where(expand, ft, jnp.where(acc, jnp.inf, st["fb"])),
            gb=jnp.where(expand, gt, st["gb"]),
            auxb=jax.tree_util.tree_map(lambda a1, b0: jnp.where(expand, a1, b0), auxt, st["auxb"]),
            nexp=jnp.where(expand, st["nexp"] + 1, jnp.where(acc, 0, st["nexp"])),
            Hinv=jnp.where(resume, Hinv_r, jnp.where(acc, Hacc, jnp.where(restart, eye, Hinv))),
            p=p_next, a=a_next, xt=xt_next,
            halvings=jnp.where(backtrack, st["halvings"] + 1, jnp.where(acc | restart | resume, 0, st["halvings"])),
            first=jnp.where(acc | resume, False, jnp.where(restart, True, st["first"])),
            early=(early_on | early) & ~resume, tried=st["tried"] | early,
            nsmall=jnp.where(acc, nsmall_acc, st["nsmall"]),
            nfail=jnp.where(acc, 0, jnp.where(restart, st["nfail"] + 1, st["nfail"])),
            k=jnp.where(to_hessian, 0, k_next), G=jnp.where(to_hessian, 0.0, G),
            H=jnp.where(hs_done, Hfd, st["H"]),
            JA=jnp.where(to_hessian, 0.0, JA), JAfin=jnp.where(hs_done, JA, st["JAfin"]),
            evals=st["evals"] + 1, status=status, phase=phase_next,
        )

    def cond(st):
        return (st["phase"] != _DONE) & (st["evals"] < limit)

    st = dict(
        x=x0, f=jnp.asarray(jnp.inf, x0.dtype), g=jnp.zeros_like(x0), aux=aux0,
        Hinv=eye if hinv0 is None else hinv0,
        p=jnp.zeros_like(x0), a=jnp.asarray(1.0), xt=x0,
        halvings=jnp.asarray(0), first=jnp.asarray(hinv0 is None), nsmall=jnp.asarray(0), nfail=jnp.asarray(0),
        k=jnp.asarray(0), G=jnp.zeros((n, n)), H=jnp.zeros((n, n)), evals=jnp.asarray(0),
        JA=jnp.zeros((opt.jac_aux, n)), JAfin=jnp.zeros((opt.jac_aux, n)),
        xb=x0, fb=jnp.asarray(jnp.inf, x0.dtype), gb=jnp.zeros_like(x0), auxb=aux0, nexp=jnp.asarray(0),
        status=jnp.asarray(OUTER_MAXITER), phase=jnp.asarray(_INIT),
        early=jnp.asarray(False), tried=jnp.asarray(False),
    )
    st = jax.lax.while_loop(cond, body, batched_like(st, x0))
    out = dict(x=st["x"], f=st["f"], g=st["g"], aux=st["aux"], status=st["status"],
               iterations=st["evals"], hessian=st["H"])
    if opt.jac_aux:
        out["aux_jacobian"] = st["JAfin"]
    return out


def _diagonal_metric(H):
    """``(inverse, ok)``: the inverse of ``diag(|H_ii|)`` (floored at 1e-6 of the
    largest) of an approximate Hessian, a starting metric for BFGS, which then
    needs to learn the couplings but not the parameters' very different scales
    (``ok`` False if not finite)."""
    d = jnp.abs(jnp.diag(H))
    ok = jnp.all(jnp.isfinite(d)) & (jnp.max(d, initial=0.0) > 0)
    d = jnp.where(ok, jnp.maximum(d, 1e-6 * jnp.max(d, initial=0.0)), 1.0)
    return jnp.diag(1.0 / d), ok
