"""The Laplace approximation with implicit gradients.

For fixed parameters ``x`` and latent effects ``u`` with joint nll
``f(x, u)``::

    u*(x) = argmin_u f(x, u)                       (damped Newton, warm start)
    L(x)  = f(x, u*) + 1/2 log det H(x, u*) - n_u/2 log(2 pi),   H = d2f/du2

``u*`` is a `jax.custom_jvp` function: its tangent is the implicit-function
derivative ``du* = -H^-1 (d2f/du dx) dx``, computed with the same sparse
factorization as the Newton steps.

The marginal ``L`` has a `jax.custom_jvp` rule of its own, so that one
factorization of ``H`` at ``u*`` serves everything an evaluation needs: the
log-determinant, the pivots (singularity check), the implicit solve for
``du*`` and the selected inverse ``Sigma`` (``H^-1`` on ``H``'s pattern)::

    dL = df(x, u*) + 1/2 <Sigma, dH>,    dH = d hessian(x, u*)[dx, du*]

JAX transposes that linear map for reverse mode, so ``grad L`` costs one
sparse solve, one selected inversion and one reverse pass through the
Hessian's values (TMB's algorithm); it never differentiates through the
factorization. Higher derivatives (the Hessian of ``L`` for standard errors)
follow by differentiating the rule again in forward mode. Nothing is
finite-differenced.
"""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ._internal import batched_like, to_device
from ._sparse import INDEX_MIN_SIZE, for_logdet, large_arrays, with_arrays

# Inner-solve status codes (data, so they survive jit and vmap).
INNER_OK = 0
INNER_MAXITER = 1
INNER_NONFINITE = 2
INNER_NOT_PD = 3
INNER_SINGULAR = 4

INNER_MESSAGES = {
    INNER_OK: "inner Newton solve converged",
    INNER_MAXITER: (
        "the inner Newton solve for the random effects did not converge in the allowed "
        "iterations; the joint nll may have no finite minimum in the random effects "
        "(does the template include their prior density?), or the start values are extreme"
    ),
    INNER_NONFINITE: (
        "the joint nll or its gradient became non-finite while solving for the random "
        "effects; check the template for log(0), exp overflow, or parameters outside "
        "their support"
    ),
    INNER_NOT_PD: (
        "the Hessian of the joint nll with respect to the random effects is not positive "
        "definite at their mode: the inner problem has no finite optimum (is the random "
        "effects' prior density in the template?)"
    ),
    INNER_SINGULAR: (
        "the Hessian with respect to the random effects is (nearly) singular at their mode: "
        "some random effect is not identified by the data and has no prior density, or its "
        "mode ran off to infinity (e.g. a group whose counts are all zero, without a "
        "random-effect prior); add the prior density or drop that effect"
    ),
}


class InnerOptions(eqx.Module):
    """Settings of the inner Newton solve.

    ``tol``: stop when the Newton decrement ``g' H^-1 g / 2`` falls below
    ``tol * max(1, |f|)``; ``max_iter``: Newton iterations (each with a
    backtracking line search of up to ``max_halvings`` halvings);
    ``mixed_min_cost``: Newton steps factorize the Hessian in single precision
    where its factorization costs at least this many flops (the layout's
    ``cost()``), None never (`Laplace._newton_factor`; the mode, the value and
    the gradient stay in double precision).
    """

    tol: float = 1e-13
    max_iter: int = 60
    max_halvings: int = 40
    mixed_min_cost: float | None = 1e8


#: an inner status of the single-precision loop only: a pivot lost to rounding
INNER_SINGLE_FAILED = -1

#: Newton iterations in single precision (`Laplace._newton_factor`) before the
#: solve goes on in double precision: from a cold start, double-precision Newton
#: takes up to 8 on the models we know
MIXED_ITERATIONS = 12

#: the data key under which a program receives the Laplace machinery's index
#: arrays (`Laplace.index_data`); the template's functions never see it
INDEX_KEY = "_tmbx_index"


def _is_zero(t) -> bool:
    return isinstance(t, jax.custom_derivatives.SymbolicZero)


def _instantiate(t):
    """A tangent as an array: zeros (of its tangent dtype) for a symbolic zero."""
    if not _is_zero(t):
        return t
    if t.aval.dtype == jax.dtypes.float0:
        return np.zeros(t.aval.shape, jax.dtypes.float0)
    return jnp.zeros(t.aval.shape, t.aval.dtype)


def _strip(data):
    if isinstance(data, dict) and INDEX_KEY in data:
        return {k: v for k, v in data.items() if k != INDEX_KEY}
    return data


class Laplace:
    """Laplace machinery for one template: ``f(x, u, data)`` and a Hessian evaluator.

    Its large index arrays (the Hessian's per-observation slots, the layout's
    coupling pairs: ~10^7 integers at 10^6 crossed rows) are constants of every
    program that evaluates it, unless the data carry them under `INDEX_KEY`
    (`index_data`): the fit program takes them so, which keeps it small (at
    1e6 crossed Bernoulli rows the cached executable was 82 MB, 2.3 s to load,
    and XLA spent seconds folding the constants)."""

    def __init__(self, f, hessian, n_u: int, options: InnerOptions = InnerOptions(),
                 quadratic: bool = False):
        self.quadratic = quadratic
        # jitted, here and in `flat`: a fit program calls f and H at a dozen sites
        # (the Newton loop, its line search and chord step, the mode, derivatives
        # of each); a jitted function is traced once per signature and its jaxpr
        # reused, where a plain one re-traces the template's Python each time
        # (owls_zinb1: 0.84 s of tracing to 0.69 s). XLA inlines the calls: the
        # compiled program is the same.
        self.f = jax.jit(lambda x, u, data: f(x, u, _strip(data)))
        self._flat_jit = jax.jit(self._flat)
        self.hessian = hessian
        self.layout = hessian.layout
        self._hessian_index = large_arrays(hessian, getattr(hessian, "TRACEABLE", ()))
        self._layout_index = large_arrays(self.layout, getattr(self.layout, "TRACEABLE", ()))
        self._bound = {}
        self._index = None
        self.n_u = n_u
        self.options = options
        # the layout's padding (ones on the diagonal of unused block positions) is
        # added at its few nonzero slots: a dense constant the size of the storage
        # would sit in every compiled program (megabytes for a banded layout)
        self._pad = np.concatenate([self.layout.padding(), [0.0]])
        nz = np.nonzero(self._pad)[0]
        self._pad_slots = to_device(nz, np.int32)
        self._pad_values = to_device(self._pad[nz])
        self._diag = to_device(self.layout.diag_slots(), np.int32)
        self.u_star = self._make_u_star()
        self.marginal = self._make_marginal()
        self._marginal_jac = None

    # -- index arrays as data ---------------------------------------------
    def index_data(self) -> dict:
        """The large index arrays, for a program's data under `INDEX_KEY` (on the
        device, once: a refit passes the same arrays)."""
        if self._index is None:
            out = {f"hessian.{a}": getattr(self.hessian, a) for a in self._hessian_index}
            out.update({f"layout.{a}": to_device(getattr(self.layout, a)) for a in self._layout_index})
            if out and self._diag.size > INDEX_MIN_SIZE:
                out["diag"] = self._diag
            self._index = out
        return self._index

    def _parts(self, data):
        """(Hessian evaluator, layout, diagonal slots) reading their index arrays
        from ``data`` where it carries them (copies: the originals keep their
        constants).

        One set of copies per index dictionary: a factorization carried through
        a loop or a conditional holds its layout as static metadata, which must
        be the same object in every branch and iteration of one trace. Entries
        hold their dictionary, so that its id is not reused while remembered."""
        idx = data.get(INDEX_KEY) if isinstance(data, dict) else None
        if not idx:
            return self.hessian, self.layout, self._diag
        hit = self._bound.get(id(idx))
        if hit is not None and hit[0] is idx:
            return hit[1:]
        lay = with_arrays(self.layout, {a: idx[f"layout.{a}"] for a in self._layout_index})
        hes = with_arrays(self.hessian, {"layout": lay, **{a: idx[f"hessian.{a}"] for a in self._hessian_index}})
        self._bound[id(idx)] = (idx, hes, lay, idx.get("diag", self._diag))
        while len(self._bound) > 16:
            self._bound.pop(next(iter(self._bound)))
        return self._bound[id(idx)][1:]

    # -- pieces -----------------------------------------------------------
    def grad_u(self, x, u, data):
        return jax.grad(self.f, argnums=1)(x, u, data)

    def flat(self, x, u, data):
        """``H`` in the layout's flat storage (padding added, dummy slot dropped)."""
        return self._flat_jit(x, u, data)

    def _flat(self, x, u, data):
        hessian = self._parts(data)[0]
        return hessian(x, u, _strip(data)).at[self._pad_slots].add(self._pad_values)[:-1]

    def factor(self, x, u, data, damping=0.0, dtype=None):
        """The layout's factorization of ``H + damping I`` at ``u`` (in ``dtype``
        if given: `_newton_factor`'s single precision)."""
        _, layout, diag = self._parts(data)
        flat = self.flat(x, u, data).at[diag].add(damping)
        return layout.factor(flat if dtype is None else flat.astype(dtype))

    def _mixed_precision(self) -> bool:
        """Whether the inner Newton steps factorize in single precision
        (`_newton_factor`): where the layout's factorization is dense linear
        algebra (``mixed``) and costs at least ``options.mixed_min_cost``."""
        if self.options.mixed_min_cost is None or not self.layout.mixed:
            return False
        return self.layout.cost() >= self.options.mixed_min_cost

    def _newton_factor(self, x, u, data, lam, low):
        """``(ok, solve, refine)`` for a Newton step: the factorization of
        ``H + lam I`` at ``u`` and its solve, in single precision if ``low``.

        A single-precision Cholesky factor costs half as much or less (LAPACK
        and XLA's matrix products at twice the width: 5.7 ms against 13 ms for
        ar1xar1's 10,000 x 10,000 banded Hessian) and its solve is accurate to
        about ``cond(H) * 6e-8`` relative. A Newton step that accurate
        converges as fast (the iteration's fixed point is still the double
        precision mode: gradients and values stay in double precision), and
        ``refine(b, s)``, one step of iterative refinement with a double-precision
        Hessian-vector product, makes the last step as accurate as a
        double-precision solve's (error ``(cond(H) * 6e-8)^2``). In double
        precision ``refine`` returns ``s``."""
        if not low:
            F = self.factor(x, u, data, lam)
            return F.ok(), F.solve, lambda b, s: s
        F = self.factor(x, u, data, lam, jnp.float32)
        dtype = u.dtype

        def solve(b):
            return F.solve(b.astype(jnp.float32)).astype(dtype)

        def refine(b, s):
            hv = jax.jvp(lambda uu: self.grad_u(x, uu, data), (u,), (s,))[1] + lam * s
            return s + solve(b - hv)

        return F.ok(), solve, refine

    # -- inner Newton ------------------------------------------------------
    def newton(self, x, u0, data):
        """Damped Newton with backtracking; returns ``(u, status, iterations)``.

        An iteration whose undamped step was accepted ends with a chord step
        from the new point with the same factorization: once its decrement is
        below tolerance the mode is within rounding after that step too (the
        error shrinks by the Hessian's relative change over one small step),
        and the factorization that would only confirm convergence is skipped
        (`jax.lax.cond`). Not on the linear-cost path, whose solves cost more
        than its factorizations.

        The factorization never leaves the iteration that made it. Carried in
        the loop's state to the next iteration's chord step (as it was), it was
        copied through the loop and the chord's conditional, and a placeholder
        factor was allocated for the first iteration: TMB's ar1xar1 at
        100 x 100 (a 32 MB banded factor) fitted in 1.04-1.07 s that way and in
        0.93-0.99 s this way, with the same 30 factorizations.

        Where `_mixed_precision`, the iterations factorize in single precision
        (`_newton_factor`) for at most `MIXED_ITERATIONS`, and what they leave
        unconverged goes on in double precision (without chord steps: that
        second loop is a fallback, and half the compile time without them).
        ar1xar1 at 100 x 100: 0.89-0.91 s a fit to 0.75-0.77 s, with the same
        factorizations; its fit program compiles in 3.4-3.6 s instead of
        2.7-2.8 s."""
        opt = self.options
        f = lambda u: self.f(x, u, data)
        f0 = f(u0)
        chord = getattr(self.layout, "iterative", None) is None

        def tolerance(fu):
            return 2 * opt.tol * jnp.maximum(1.0, jnp.abs(fu))

        def cond(st):
            return (~st[5]) & (st[0] < opt.max_iter)

        def iteration(st, low, chord=chord):
            it, u, fu, lam, status, done = st
            g = self.grad_u(x, u, data)
            ok, solve, refine = self._newton_factor(x, u, data, lam, low)
            step = -solve(g)
            dec = -jnp.dot(g, step)
            good_factor = ok & jnp.isfinite(dec) & (dec >= 0)
            converged = good_factor & (dec <= tolerance(fu)) & (lam == 0)
            if low:  # the step that ends the solve, to double precision
                step = jax.lax.cond(converged, lambda: refine(-g, step), lambda: step)

            def ls_cond(ls):
                a, fnew, k = ls
                ok = jnp.isfinite(fnew) & (fnew <= fu - 1e-4 * a * dec + 1e-12 * jnp.abs(fu))
                return (~ok) & (k < opt.max_halvings)

            def ls_body(ls):
                a, _, k = ls
                a = a * 0.5
                return a, f(u + a * step), k + 1

            f_full = f(u + step)  # the full step's value: the search's first trial, and the converged value
            a, fnew, k = jax.lax.while_loop(ls_cond, ls_body, batched_like((1.0, f_full, 0), step))
            accepted = good_factor & jnp.isfinite(fnew) & (
                fnew <= fu - 1e-4 * a * dec + 1e-12 * jnp.abs(fu)
            )
            # on convergence take the full Newton step too: quadratic convergence
            # then leaves u* exact to rounding, which the implicit gradient assumes
            accepted = accepted | converged
            u_new = jnp.where(accepted, u + jnp.where(converged, 1.0, a) * step, u)
            f_new = jnp.where(accepted, jnp.where(converged, f_full, fnew), fu)
            # Levenberg-style damping: raise when the factor or the step fails
            scale = jnp.maximum(1.0, jnp.max(jnp.abs(g)))
            lam_new = jnp.where(
                good_factor & accepted,
                jnp.where(k == 0, 0.0, lam * 0.1),
                jnp.maximum(lam * 10.0, 1e-6 * scale),
            )
            stuck = (~good_factor | ~accepted) & (lam > 1e12 * scale) & ~converged
            if chord:
                try_chord = good_factor & accepted & (lam == 0) & ~converged

                def chord_step():
                    g_c = self.grad_u(x, u_new, data)
                    step_c = -solve(g_c)
                    dec_c = -jnp.dot(g_c, step_c)
                    if low:  # the step is taken only when it ends the solve
                        step_c = jax.lax.cond(dec_c <= tolerance(f_new), lambda: refine(-g_c, step_c),
                                              lambda: step_c)
                    return step_c, dec_c, f(u_new + step_c)

                def no_chord():
                    return jnp.zeros_like(u), jnp.asarray(jnp.inf, dec.dtype), f_new

                step_c, dec_c, f_c = jax.lax.cond(try_chord, chord_step, no_chord)
                chord_ok = try_chord & jnp.isfinite(dec_c) & (dec_c >= 0) & (dec_c <= tolerance(f_new))
                u_new = jnp.where(chord_ok, u_new + step_c, u_new)
                f_new = jnp.where(chord_ok, f_c, f_new)
                converged = converged | chord_ok
            status_new = jnp.where(
                converged, INNER_OK, jnp.where(stuck, INNER_NOT_PD, status)
            )
            out = (it + 1, u_new, f_new, lam_new, status_new, converged | stuck)
            if low:
                # a pivot lost to rounding: this iteration is redone in double
                # precision (the loop ends with the state it started with)
                out = jax.tree_util.tree_map(lambda a, b: jnp.where(ok, b, a),
                                             (it, u, fu, lam, INNER_SINGLE_FAILED, True), out)
            return out

        init = batched_like((0, u0, f0, jnp.asarray(0.0), jnp.asarray(INNER_MAXITER), jnp.asarray(False)), u0)
        if self._mixed_precision():
            # single precision first, for at most MIXED_ITERATIONS iterations;
            # what it leaves unconverged (a pivot lost, an ill-conditioned
            # Hessian converging slowly) goes on in double precision. A
            # converged solve enters the second loop done and leaves it at
            # once, vmapped too (a conditional would run both under vmap).
            st = jax.lax.while_loop(lambda st: cond(st) & (st[0] < MIXED_ITERATIONS),
                                    lambda st: iteration(st, True), init)
            it, u, fu, lam, status, done = st
            init = (it, u, fu, lam, jnp.where(status == INNER_OK, INNER_OK, INNER_MAXITER), status == INNER_OK)
            # (the fallback without chord steps: half the extra compile time)
            it, u, fu, lam, status, done = jax.lax.while_loop(
                cond, lambda st: iteration(st, False, chord=False), init)
        else:
            it, u, fu, lam, status, done = jax.lax.while_loop(cond, lambda st: iteration(st, False), init)
        status = jnp.where(jnp.isfinite(fu), status, INNER_NONFINITE)
        return u, status, it

    # -- implicit u*(x) -----------------------------------------------------
    def _make_u_star(self):
        lap = self

        @jax.custom_jvp
        def u_star(x, u0, data):
            u, status, _ = lap.newton(x, u0, data)
            return u, status

        @u_star.defjvp
        def u_star_jvp(primals, tangents):
            x, u0, data = primals
            dx, _, ddata = tangents
            u, status = u_star(x, u0, data)
            _, rhs = jax.jvp(lambda xx, dd: lap.grad_u(xx, u, dd), (x, data), (dx, ddata))
            F = lap.factor(x, u, data)
            du = -F.solve(rhs)
            return (u, status), (du, np.zeros(np.shape(status), dtype=jax.dtypes.float0))

        return u_star

    # -- the marginal -------------------------------------------------------
    def _at_mode(self, fval, flat, status, layout):
        """Value of the marginal at the mode (``fval = f(x, u*)``, ``flat = H``) and
        the status after the singularity check; also the factorization of ``H``."""
        F = for_logdet(layout.factor(flat))
        val = fval + 0.5 * F._logdet() - 0.5 * self.n_u * math.log(2 * math.pi)
        piv = jax.lax.stop_gradient(jnp.abs(F.pivots()))
        singular = jnp.min(piv) ** 2 < 1e-14 * jnp.max(piv) ** 2
        status = jnp.where((status == INNER_OK) & singular, INNER_SINGULAR, status)
        return val, status, F

    def mode_jacobian(self, x, u, data, F=None):
        """``du*/dx = -H^-1 d2f/du dx`` at the mode ``u`` of ``x`` (``F``: the
        factorization of ``H`` there, if at hand): the implicit derivative that
        `u_star`'s rule gives, without solving for the mode again."""
        F = self.factor(x, u, data) if F is None else F
        cross = jax.jacfwd(lambda xx: self.grad_u(xx, u, data))(x)
        return -F.solve(cross)

    def _make_marginal(self, with_jac=False):
        lap = self
        jac = self.mode_jacobian

        @jax.custom_jvp
        def marginal(x, u0, data):
            u, status = lap.u_star(x, u0, data)
            val, status, F = lap._at_mode(lap.f(x, u, data), lap.flat(x, u, data), status, lap._parts(data)[1])
            return (val, u, status, jac(x, u, data, F)) if with_jac else (val, u, status)

        def marginal_jvp(primals, tangents):
            x, u0, data = primals
            dx, _, ddata = tangents
            # with the mode's Jacobian at hand (`objective_with_jac`) and no data
            # tangent (a fit's gradient), du* = J dx: a product instead of a solve,
            # and its transpose in the gradient another product
            by_jac = with_jac and all(map(_is_zero, jax.tree_util.tree_leaves(ddata, is_leaf=_is_zero)))
            dx, ddata = _instantiate(dx), jax.tree_util.tree_map(_instantiate, ddata, is_leaf=_is_zero)
            # u_star (not the bare Newton loop): differentiating this rule again
            # (forward mode, for Hessians of L) then uses the implicit derivative
            u, status = lap.u_star(x, u0, data)
            # linearized once: the program holds one copy of f and of the Hessian
            # values for both the value and the tangent
            fval, f_lin = jax.linearize(lap.f, x, u, data)
            flat, flat_lin = jax.linearize(lap.flat, x, u, data)
            val, status, F = lap._at_mode(fval, flat, status, lap._parts(data)[1])
            J = jac(x, u, data, F) if with_jac else None
            if by_jac:
                du = J @ dx
            else:  # du* = -H^-1 (d grad_u f)[dx, ddata]
                _, rhs = jax.jvp(lambda xx, dd: lap.grad_u(xx, u, dd), (x, data), (dx, ddata))
                du = -F.solve(rhs)
            dval = f_lin(dx, du, ddata) + 0.5 * jnp.sum(F.logdet_grad() * flat_lin(dx, du, ddata))
            out = (val, u, status)
            tan = (dval, du, np.zeros(np.shape(status), dtype=jax.dtypes.float0))
            if with_jac:  # a by-product for warm starts, not differentiated
                out, tan = out + (J,), tan + (jnp.zeros_like(J),)
            return out, tan

        marginal.defjvp(marginal_jvp, symbolic_zeros=with_jac)
        return marginal

    def objective_with_jac(self, x, u0, data):
        """`objective` plus ``J = du*/dx`` at ``x`` (no derivative of its own): the
        optimizer predicts the mode at its next point as ``u* + J dx`` and starts the
        inner Newton solve there (fewer iterations; one solve with ``n_x`` columns)."""
        if self._marginal_jac is None:
            self._marginal_jac = self._make_marginal(with_jac=True)
        val, u, status, J = self._marginal_jac(x, jax.lax.stop_gradient(u0), data)
        return val, (u, status, J)

    def objective(self, x, u0, data):
        """``(L(x), (u*, status))``: Laplace marginal nll and the inner solution."""
        if self.quadratic:
            return self._objective_quadratic(x, u0, data)
        val, u, status = self.marginal(x, jax.lax.stop_gradient(u0), data)
        return val, (u, status)

    def _objective_quadratic(self, x, u0, data):
        """The joint nll is quadratic in u (Gaussian responses, identity link): one
        Newton step from any point is the exact mode, and the Laplace
        approximation is the exact marginal. Differentiating straight through
        that step and the factorization gives the exact gradient, with no inner
        loop and no implicit-function rule: a much smaller program."""
        u0 = jax.lax.stop_gradient(u0)
        g = self.grad_u(x, u0, data)
        F0 = self.factor(x, u0, data)
        u = u0 - F0.solve(g)
        val = self.f(x, u, data) + 0.5 * F0.logdet() - 0.5 * self.n_u * math.log(2 * math.pi)
        piv = jax.lax.stop_gradient(jnp.abs(F0.pivots()))
        ok = F0.ok() & (jnp.min(piv) ** 2 >= 1e-14 * jnp.max(piv) ** 2)
        status = jnp.where(ok, INNER_OK, jnp.where(F0.ok(), INNER_SINGULAR, INNER_NOT_PD))
        return val, (u, status)
