"""`GlmmFit`: the result of `tmbx.glmm`, with glmmTMB's methods."""

from __future__ import annotations

import dataclasses
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from .._internal import LazyModule, eval_method

scipy_special = LazyModule("scipy.special")

from ._design import new_design

_COMPONENT_OF = {"beta": "cond", "betazi": "zi", "betadisp": "disp"}


@dataclasses.dataclass
class VarCorrTerm:
    """One grouping term's random-effect covariance (glmmTMB's VarCorr entry)."""

    sd: pd.Series
    corr: pd.DataFrame
    structure: str
    extra: dict

    @property
    def cov(self) -> pd.DataFrame:
        s = self.sd.to_numpy()
        return pd.DataFrame(self.corr.to_numpy() * np.outer(s, s), index=self.sd.index, columns=self.sd.index)

    def __repr__(self):
        return f"VarCorrTerm(structure={self.structure!r}, sd={dict(self.sd.round(6))})"


class GlmmFit:
    """A fitted generalized linear mixed model (glmmTMB's ``glmmTMB`` object)."""

    def __init__(self, template, fit, formula, call):
        self.template = template
        self.model = template.model
        self.family = template.family
        self.design = template.design
        self._fit = fit
        self.formula = formula
        self.call = call
        self.reml = template.reml
        self._sdr = None
        self._cov = None

    # ------------------------------------------------------------ basics
    @property
    def loglik(self) -> float:
        return self._fit.loglik

    @property
    def nobs(self) -> int:
        return int(self.design.nobs)

    @property
    def df_model(self) -> int:
        """Number of estimated parameters (glmmTMB's ``df`` of logLik)."""
        sp = self.model.space
        n = sp.n_x
        if self.reml:
            n += sum(int(np.sum(sp.index[k] >= 0)) for k in ("beta", "betazi") if k in sp.random)
        return int(n)

    @property
    def aic(self) -> float:
        return -2 * self.loglik + 2 * self.df_model

    @property
    def bic(self) -> float:
        return -2 * self.loglik + math.log(self.nobs) * self.df_model

    @property
    def df_resid(self) -> int:
        return self.nobs - self.df_model

    @property
    def converged(self) -> bool:
        return self._fit.converged

    @property
    def message(self) -> str:
        return self._fit.message

    @property
    def loglik_mc_se(self) -> float:
        """Monte Carlo standard error of `loglik` on the linear-cost path
        (``solver="iterative"``); 0 for the exact path."""
        return self._fit.loglik_mc_se

    def _par(self) -> dict:
        p = self.model.space.unflatten(np.asarray(self._fit.x, float), np.asarray(self._fit.u, float))
        return {k: np.asarray(v) for k, v in p.items()}

    @property
    def fixef(self) -> dict:
        """Fixed effects by component ("cond", "zi", "disp"): pandas Series by coefficient."""
        p = self._par()
        out = {}
        for key, comp in _COMPONENT_OF.items():
            if key in p:
                out[comp] = pd.Series(p[key], index=self.template.names[key], name=comp)
        return out

    # ------------------------------------------------------------ covariance
    def sdreport(self):
        if self._sdr is None:
            self._sdr = self._fit.sdreport()
        return self._sdr

    def _full_cov(self) -> pd.DataFrame:
        """Covariance of every fixed-model parameter (beta, betazi, betadisp, theta, psi);
        for REML fits, beta's block comes from the joint precision as glmmTMB does."""
        if self._cov is not None:
            return self._cov
        sp = self.model.space
        rep = self.sdreport()
        V = rep.cov_fixed
        labels = []
        for name in sp.fixed:
            for i, idx in enumerate(sp.index[name]):
                if idx >= 0 and sp.first["x"][idx] == (name, i):
                    labels.append((name, i))
        cov = pd.DataFrame(V, index=pd.MultiIndex.from_tuples(labels), columns=pd.MultiIndex.from_tuples(labels))
        if self.reml:
            cov = self._reml_cov(cov)
        self._cov = cov
        return cov

    def _reml_cov(self, cov):
        sp = self.model.space
        x, u, d = jnp.asarray(self._fit.x), jnp.asarray(self._fit.u), self._fit.data
        names = [n for n in ("beta", "betazi") if n in sp.random]
        cols = np.concatenate([sp.index[n] for n in names])
        labels = [(n, i) for n in names for i in range(len(sp.index[n]))]
        V = np.nan_to_num(cov.to_numpy())
        if hasattr(self._fit, "_reml_beta"):
            # profiled least squares: the same blocks, from the optimizer's own run
            Hinv, J = self._fit._reml_beta
        else:
            lap = self.model.laplace

            @self.model.jit  # (the model's compiler options: level 0 for a small one)
            def core(x, u):
                F = lap.factor(x, u, d)
                E = jnp.zeros((u.shape[0], len(cols))).at[cols, jnp.arange(len(cols))].set(1.0)
                Hinv = F.solve(E)[cols]
                # (du*/dx at the mode without the Newton solve, as `_ranef_sd`)
                J = lap.mode_jacobian(x, u, d, F)[cols] if x.shape[0] else jnp.zeros((len(cols), 0))
                return Hinv, J

            Hinv, J = (np.asarray(a) for a in core(x, u))
        Cbb = Hinv + J @ V @ J.T
        Cbx = J @ V
        idx = pd.MultiIndex.from_tuples(labels + list(cov.index))
        full = np.block([[Cbb, Cbx], [Cbx.T, cov.to_numpy()]])
        return pd.DataFrame(full, index=idx, columns=idx)

    def vcov(self, full: bool = False):
        """Covariance of the fixed effects: dict component -> DataFrame (``full``: all parameters)."""
        cov = self._full_cov()
        if full:
            return cov
        out = {}
        for key, comp in _COMPONENT_OF.items():
            if key in self.template.names:
                sel = [(key, i) for i in range(len(self.template.names[key])) if (key, i) in cov.index]
                nm = [self.template.names[key][i] for _, i in sel]
                out[comp] = pd.DataFrame(cov.loc[sel, sel].to_numpy(), index=nm, columns=nm)
        return out

    def se(self) -> dict:
        return {k: pd.Series(np.sqrt(np.diag(v.to_numpy())), index=v.index) for k, v in self.vcov().items()}

    # ------------------------------------------------------------ random effects
    @property
    def varcorr(self) -> dict:
        """Random-effect sds and correlations by group name (glmmTMB's VarCorr)."""
        p = self._par()
        out = {}
        for t in self.template.terms:
            theta = p["theta" if t.component == "cond" else "thetazi"][t.theta_slice]
            rep = t.struct.report(jnp.asarray(theta))
            sd = pd.Series(np.asarray(rep["sd"], float).reshape(-1), index=t.terms)
            corr = pd.DataFrame(np.asarray(rep["corr"], float).reshape(t.k, t.k), index=t.terms, columns=t.terms)
            extra = {k: v for k, v in rep.items() if k not in ("sd", "corr")}
            term = VarCorrTerm(sd, corr, t.struct.name, extra)
            if t.component == "zi":
                out.setdefault("zi", {})[t.group] = term
            else:
                out[t.group] = term
        return out

    @property
    def sigma(self):
        """glmmTMB's ``sigma()``: the family's dispersion when ``dispformula`` is ~1."""
        fam = self.family
        if not fam.has_disp:
            return 1.0
        disp = self.design.components["disp"]
        if not disp.intercept_only:
            return None
        bd = float(self._par()["betadisp"][0])
        psi = self._par().get("psi")
        return float(eval_method(fam, "sigma", bd, psi))

    def ranef(self, condVar: bool = True) -> dict:
        """Conditional modes of the random effects (and their sds): dict group -> DataFrame."""
        p = self._par()
        rep = self.sdreport() if condVar else None
        out = {}
        for t in self.template.terms:
            bkey, thkey = ("b", "theta") if t.component == "cond" else ("bzi", "thetazi")
            u = p[bkey][t.b_slice].reshape(t.m, t.k)
            T = eval_method(t.struct, "factor", p[thkey][t.theta_slice])
            b = u @ T.T
            df = pd.DataFrame(b, index=pd.Index(t.levels, name=t.group), columns=t.terms)
            if condVar:
                df_sd = self._ranef_sd(t, T, bkey)
                for j, name in enumerate(t.terms):
                    df[f"se:{name}"] = df_sd[:, j]
            key = t.group if t.component == "cond" else f"zi:{t.group}"
            out[key] = df
        return out

    def _ranef_sd(self, t, T, bkey):
        """Conditional sds of b = T(theta) u per level (TMB's sdreport formula for the
        random effects glmmTMB reports): Var(b) = T H_uu^-1 T' + Jb V Jb', with the
        k x k blocks of H_uu^-1 from the selected inverse of the sparse factor and
        Jb = db*/dx the total derivative (through u*(x) and through T(theta))."""
        sp = self.model.space
        lap = self.model.laplace
        pos = sp.index[bkey][t.b_slice].reshape(t.m, t.k)
        rows = np.repeat(pos, t.k, axis=1).reshape(-1)
        cols = np.tile(pos, (1, t.k)).reshape(-1)
        thkey = "theta" if bkey == "b" else "thetazi"
        x, u, d = jnp.asarray(self._fit.x), jnp.asarray(self._fit.u), self._fit.data
        V = jnp.asarray(np.nan_to_num(self.sdreport().cov_fixed))

        def b_of(xx, uu):
            p = sp.unflatten(xx, uu)
            Tt = t.struct.factor(p[thkey][t.theta_slice])
            return (p[bkey][t.b_slice].reshape(t.m, t.k) @ Tt.T).reshape(-1)

        @self.model.jit  # (the model's compiler options: level 0 for a small one)
        def core(x, u):
            F = lap.factor(x, u, d)
            blocks = F.inverse_entries(rows, cols).reshape(t.m, t.k, t.k)
            Tt = t.struct.factor(sp.unflatten(x, u)[thkey][t.theta_slice])
            var = jnp.einsum("jl,mlr,jr->mj", Tt, blocks, Tt)
            if x.shape[0]:
                # u*(x) to first order, u + J dx (`Laplace.mode_jacobian`, the
                # implicit derivative `u_star` gives): the same Jb without the
                # Newton solve in the program (its compile was most of a fresh
                # process's ranef())
                J = lap.mode_jacobian(x, u, d, F)
                Jb = jax.jacfwd(lambda xx: b_of(xx, u + J @ (xx - x)))(x)
                var = var + jnp.einsum("ij,jk,ik->i", Jb, V, Jb).reshape(t.m, t.k)
            return var

        return np.sqrt(np.maximum(np.asarray(core(x, u)), 0.0))

    # ------------------------------------------------------------ predictions
    def _eta_fn(self, d, component="cond", population=False):
        tmpl = self.template
        terms = [t for t in tmpl.terms if t.component == component]

        def fn(p):
            comp = d[component]
            eta = comp["X"] @ p["beta" if component == "cond" else "betazi"] + comp["offset"]
            if not population:
                for j, t in enumerate(terms):
                    bkey, thkey = ("b", "theta") if component == "cond" else ("bzi", "thetazi")
                    u = p[bkey][t.b_slice].reshape(t.m, t.k)
                    T = t.struct.factor(p[thkey][t.theta_slice])
                    bv = u @ T.T
                    idx = comp["index"][j]
                    contrib = jnp.sum(comp["Z"][j] * bv[jnp.maximum(idx, 0)], axis=1)
                    eta = eta + jnp.where(idx >= 0, contrib, 0.0)
            return eta

        return fn

    def _newdata(self, newdata):
        if newdata is None:
            des = self.design
        else:
            des = new_design(self.design, newdata, allow_new_levels=True)
        d = {}
        for key, comp in des.components.items():
            d[key] = {"X": jnp.asarray(comp.X), "offset": jnp.asarray(comp.offset),
                      "index": [jnp.asarray(t.index) for t in comp.re], "Z": [jnp.asarray(t.Z) for t in comp.re]}
        return des, d

    def predict(self, newdata=None, type="link", re_form=None, se_fit=False):
        """Predictions (glmmTMB's ``predict``).

        ``type``: "link" or "response" (conditional mean, zero-inflation included);
        ``re_form``: None for conditional predictions, ``"NA"``/``np.nan``/``False``
        for population-level; new levels get zero random effects. ``se_fit``:
        delta-method standard errors over fixed and random effects (as glmmTMB).
        Returns an array, or a DataFrame with ``fit`` and ``se_fit``.
        """
        population = re_form is not None and not (isinstance(re_form, str) and re_form.strip() in ("", "~."))
        if isinstance(re_form, float) and np.isnan(re_form):
            population = True
        if type not in ("link", "response"):
            raise ValueError(f"type must be 'link' or 'response', got {type!r}")
        des, d = self._newdata(newdata)
        prog = self._predict_program(type, population)
        x, u = jnp.asarray(self._fit.x), jnp.asarray(self._fit.u)
        fit = np.asarray(prog(x, u, d))
        if not se_fit:
            return fit
        se = self._delta_se(lambda xx, uu: prog(xx, uu, d), d)
        if not population:
            # a level not seen in fitting has a random effect with no data: its
            # conditional variance is the prior covariance (as glmmTMB, which adds
            # the new level to the model)
            extra = self._new_level_variance(d, "cond")
            if type == "response" and np.any(extra > 0):
                eta = self._predict_program("link", population)(x, u, d)
                mu_eta = np.asarray(eval_method(self.family.link, "mu_eta", eta))
                extra = extra * mu_eta**2
            se = np.sqrt(se**2 + extra)
        return pd.DataFrame({"fit": fit, "se_fit": se})

    def _linear_predictors(self, p, d, population=False):
        """``(eta, eta_zi or None, disp or None)`` at the parameters ``p`` (by name)
        on the data ``d`` (`_newdata`), traceable: predictions, residuals, the
        simulator and the zero-inflation check share it."""
        eta = self._eta_fn(d, "cond", population)(p)
        zi = self._eta_fn(d, "zi", population)(p) if "zi" in d else None
        disp = d["disp"]["X"] @ p["betadisp"] + d["disp"]["offset"] if self.family.has_disp else None
        return eta, zi, disp

    def _program(self, key, make):
        """The compiled program ``make()`` (a function for `Model.jit`), kept under
        ``key`` for this fit: a method called again runs it again instead of
        tracing a new closure. (Op by op, each operation's first use in a process
        compiles its own program: 0.7-1.0 s of a fresh process's first ``predict()``.)"""
        progs = self.__dict__.setdefault("_programs", {})
        if key not in progs:
            progs[key] = self.model.jit(make())
        return progs[key]

    def _predict_program(self, type, population):
        """Predictions ``(x, u, d) -> eta`` (``type="link"``) or the conditional mean,
        one compiled program per (type, population) and data shapes; plain `jax.jit`
        (`_delta_se` differentiates it inside its own program)."""
        progs = self.__dict__.setdefault("_predict_programs", {})
        key = (type, population)
        if key not in progs:
            def run(x, u, d):
                p = self.model.space.unflatten(x, u)
                eta, zi, disp = self._linear_predictors(p, d, population)
                if type == "link":
                    return eta
                return self.family.mean(eta, disp=disp, psi=p.get("psi"), zi=zi, trials=None)

            progs[key] = jax.jit(run)
        return progs[key]

    def _new_level_variance(self, d, component):
        p = self._par()
        extra = np.zeros(d[component]["X"].shape[0])
        terms = [t for t in self.template.terms if t.component == component]
        for j, t in enumerate(terms):
            idx = np.asarray(d[component]["index"][j])
            new = idx < 0
            if not new.any():
                continue
            th = p["theta" if component == "cond" else "thetazi"][t.theta_slice]
            S = eval_method(t.struct, "cov", th)
            Z = np.asarray(d[component]["Z"][j])[new]
            extra[new] += np.einsum("ij,jk,ik->i", Z, S, Z)
        return extra

    #: `_delta_se` takes its random part from each row's own effects up to this
    #: many per row (random-effect terms times their columns); beyond (an ar1 or
    #: spatial term of many levels: every row depends on all of them) reverse mode
    MAX_ROW_EFFECTS = 16

    def _delta_se(self, phi, newd=None):
        """sd of phi(x, u*) by TMB's sdreport formula (fixed + random uncertainty);
        ``newd``: the prediction data (`_newdata`) phi reads, whose rows each
        depend on one level per random-effect term.

        The random part is ``P H^-1 P'`` per row, ``P = dphi/du``. Each row depends
        on one level of each term, so P is recovered from one forward derivative
        per term and column (the levels of a term never share a row:
        `_row_effects`) and the quadratic forms need only the entries of H^-1
        between a row's own effects (`inverse_entries`): memory linear in the
        rows. (Reverse-mode over every row, the fallback where a layout lacks
        those entries, holds rows x rows numbers: 161 GB at 1e5 rows.)"""
        lap = self.model.laplace
        x, u, d = jnp.asarray(self._fit.x), jnp.asarray(self._fit.u), self._fit.data
        V = jnp.asarray(np.nan_to_num(self.sdreport().cov_fixed))
        effects = self._row_effect_pairs(newd)
        if effects is not None:
            ucol, seeds, pair_r, pair_c = effects
            n_c = ucol.shape[1]
        elif lap is not None:
            n = int(np.shape(jax.eval_shape(lambda: phi(x, u)))[0])
            if 16.0 * n * n > 8e9:
                raise ValueError(
                    f"standard errors of {n:,} predictions need the inverse Hessian's entries between each "
                    f"row's random effects, which this model's latent layout ({lap.layout.kind}) does not "
                    "provide; predict a subset of rows (newdata) or without se_fit")

        @self.model.jit  # (the model's compiler options: level 0 for a small one)
        def var(x, u):
            if lap is None:
                D = jax.jacfwd(lambda xx: phi(xx, u))(x)
                return jnp.einsum("ij,jk,ik->i", D, V, D)
            F = lap.factor(x, u, d)
            J = lap.mode_jacobian(x, u, d, F)  # (u*(x) to first order, as `_ranef_sd`)
            D = jax.jacfwd(lambda xx: phi(xx, u + J @ (xx - x)))(x)
            fixed = jnp.einsum("ij,jk,ik->i", D, V, D)
            if effects is None:
                Pu = jax.jacrev(lambda uu: phi(x, uu))(u)
                return fixed + jnp.einsum("ij,ji->i", Pu, F.solve(Pu.T))
            Pc = jax.vmap(lambda s: jax.jvp(lambda uu: phi(x, uu), (u,), (s,))[1])(jnp.asarray(seeds))
            Hinv = F.inverse_entries(pair_r, pair_c).reshape(ucol.shape[0], n_c, n_c)
            return fixed + jnp.einsum("an,bn,nab->n", Pc, Pc, Hinv)

        return np.sqrt(np.maximum(np.asarray(var(x, u)), 0))

    def _row_effect_pairs(self, newd):
        """``(ucol, seeds, pair_r, pair_c)`` where `_delta_se` takes the random part
        from each row's own effects (`_row_effects`; ``pair_*``: every row's pairs
        of them, (rows, colours, colours) flattened), None where it uses reverse
        mode: no prediction data, held or shared effects, more than
        `MAX_ROW_EFFECTS` a row (rows x effects^2 entries cost more), or a
        layout without those entries of H^-1."""
        lap = self.model.laplace
        effects = self._row_effects(newd) if newd is not None and lap is not None else None
        if effects is None or effects[0].shape[1] > self.MAX_ROW_EFFECTS:
            return None
        ucol, seeds = effects
        n_c = ucol.shape[1]
        pair_r = np.repeat(ucol[:, :, None], n_c, axis=2).reshape(-1)
        pair_c = np.repeat(ucol[:, None, :], n_c, axis=1).reshape(-1)
        # a row without a level of some term (a level not seen in fitting) has a
        # zero derivative there: its pairs with that effect read any entry the
        # layout has, a diagonal one (an off-pattern pair sent every prediction
        # with a new level to reverse mode)
        diag = np.where(pair_r >= 0, pair_r, np.maximum(pair_c, 0))
        both = (pair_r >= 0) & (pair_c >= 0)
        pair_r, pair_c = np.where(both, pair_r, diag), np.where(both, pair_c, diag)
        x, u, d = jnp.asarray(self._fit.x), jnp.asarray(self._fit.u), self._fit.data
        try:  # (traced only: does the layout give these entries?)
            jax.eval_shape(lambda: lap.factor(x, u, d).inverse_entries(pair_r, pair_c))
        except (AttributeError, NotImplementedError):
            return None
        return ucol, seeds, pair_r, pair_c

    def _row_effects(self, d):
        """``(ucol, seeds)`` for `_delta_se`: ``ucol[i, c]`` the position in u of row
        i's effect of colour c (one colour per random-effect term and column; -1
        where the row has no level, its derivative then 0), ``seeds[c]`` the u
        vector with ones at every level's effect of colour c. None where some
        random effect is held or shared (``map``)."""
        sp = self.model.space
        if set(sp.random) - {"b", "bzi"}:  # (REML: beta among the integrated effects)
            return None
        cols, seeds = [], []
        for comp, bkey in (("cond", "b"), ("zi", "bzi")):
            if comp not in d:
                continue
            terms = [t for t in self.template.terms if t.component == comp]
            for j, t in enumerate(terms):
                pos = np.asarray(sp.index[bkey][t.b_slice]).reshape(t.m, t.k)
                if np.any(pos < 0) or np.unique(pos).size != pos.size:
                    return None
                idx = np.asarray(d[comp]["index"][j])
                for c in range(t.k):
                    cols.append(np.where(idx >= 0, pos[np.maximum(idx, 0), c], -1))
                    seed = np.zeros(sp.n_u)
                    seed[pos[:, c]] = 1.0
                    seeds.append(seed)
        if not cols:
            return None
        return np.stack(cols, axis=1), np.stack(seeds)

    def fitted(self):
        return self.predict(type="response")

    def residuals(self, type="response"):
        """Residuals: "response" (y - mu; proportions for binomial), "pearson", "deviance"."""
        if type not in ("response", "pearson", "deviance"):
            raise ValueError(f"type must be 'response', 'pearson' or 'deviance', got {type!r}")
        y = self.design.y.astype(float)
        trials = self.design.trials
        mu = self.predict(type="response")
        yy = y / trials if trials is not None else y
        if type == "response":
            return yy - mu
        _, d = self._newdata(None)

        def make():
            fam = self.family

            def res(x, u, d, y, trials):
                p = self.model.space.unflatten(x, u)
                eta, zi, disp = self._linear_predictors(p, d)
                if type == "pearson":
                    return fam.variance(eta, disp=disp, psi=p.get("psi"), zi=zi, trials=trials)
                return fam.deviance_residuals(y, eta, disp=disp, psi=p.get("psi"), trials=trials)

            return res

        res = self._program(("residuals", type), make)
        out = np.asarray(res(jnp.asarray(self._fit.x), jnp.asarray(self._fit.u), d, y, trials))
        return (yy - mu) / np.sqrt(out) if type == "pearson" else out

    def refit(self, newresp=None) -> "GlmmFit":
        """Fit the same model again (lme4's and glmmTMB's ``refit``), to ``newresp`` (a
        response vector for the same rows) or to the same response: the compiled
        program is reused, so this is the time of the optimization alone."""
        import dataclasses as dc

        from .._model import Fit

        design = self.design
        y = np.asarray(design.y if newresp is None else newresp, float).reshape(-1)
        if y.shape != np.shape(design.y):
            raise ValueError(f"newresp has {y.size} values; the model was fitted to {np.size(design.y)} rows")
        self.family.check_support(y, design.trials)
        lmm = getattr(self._fit, "_lmm", None)
        fit = None if lmm is None else lmm.fit_model(y=y)
        if fit is None:
            model = self.model
            data = model._prepare_data(dict(model.data, y=jnp.asarray(y)))
            x0, u0 = model._starts(None)
            fit = Fit(model, data, model.run_fit(x0, u0, data))
            fit._warn()
        template = self.template if newresp is None else dc.replace(self.template, design=dc.replace(design, y=y))
        return GlmmFit(template, fit, self.formula, dict(self.call))

    def simulate(self, nsim: int = 1, seed: int = 0) -> np.ndarray:
        """Simulate responses with new random effects (glmmTMB's ``simulate``): (nsim, N)."""
        if nsim < 1:
            raise ValueError(f"nsim must be at least 1, got {nsim}")
        from ..diagnostics._residuals import _simulator

        p = {k: jnp.asarray(v) for k, v in self._par().items()}
        keys = jax.random.split(jax.random.PRNGKey(seed), nsim)
        return np.asarray(_simulator(self, conditional=False)(p, keys))

    # ------------------------------------------------------------ inference
    def coef_table(self, component="cond", ddf=None) -> pd.DataFrame:
        """Coefficient table: Wald z tests, or t tests with ``ddf`` ("satterthwaite",
        "kenward-roger", "lme4"'s level counting "containment") for LMMs."""
        if ddf is not None:
            from ..inference._ddf import coef_table_ddf

            return coef_table_ddf(self, component=component, ddf=ddf)
        est = self.fixef[component]
        se = self.se()[component]
        z = est / se
        p = scipy_special.erfc(np.abs(z) / math.sqrt(2.0))  # 2 P(Z > |z|), without importing scipy.stats
        return pd.DataFrame({"Estimate": est, "Std. Error": se, "z value": z, "Pr(>|z|)": p})

    def confint(self, method="wald", level=0.95, parm=None, **kwargs) -> pd.DataFrame:
        """Confidence intervals: DataFrame indexed by parameter name with columns
        estimate, lower, upper.

        ``method``: "wald" (glmmTMB's: sds on the log scale, back-transformed),
        "profile" (likelihood profile, lme4's scale; see `profile`) or "boot"
        (parametric bootstrap percentile intervals; see `bootstrap`).
        """
        if not 0 < level < 1:
            raise ValueError(f"level must be between 0 and 1, got {level}")
        if method == "profile":
            return self.profile(parm=parm, **kwargs).confint(level=level)
        if method == "boot":
            return self.bootstrap(**kwargs).confint(level=level, parm=parm)
        if method != "wald":
            raise ValueError(f"confint method must be 'wald', 'profile' or 'boot', got {method!r}")
        zq = float(scipy_special.ndtri(0.5 + level / 2))  # the normal quantile (scipy.stats takes 0.25 s to import)
        rows = []
        for comp, est in self.fixef.items():
            if comp == "disp" and self.sigma is not None:
                continue
            se = self.se()[comp]
            prefix = "" if comp == "cond" else f"{comp}~"
            for name in est.index:
                rows.append((prefix + name, est[name], est[name] - zq * se[name], est[name] + zq * se[name]))
        cov = self._full_cov()
        p = self._par()
        for t in self.template.terms:
            key = "theta" if t.component == "cond" else "thetazi"
            prefix = "" if t.component == "cond" else "zi~"
            log_sd_idx = _log_sd_positions(t)
            for j, pos in log_sd_idx:
                gi = t.theta_slice.start + pos
                th = float(p[key][gi])
                se = math.sqrt(cov.loc[(key, gi), (key, gi)]) if (key, gi) in cov.index else float("nan")
                rows.append((f"{prefix}sd_{t.terms[j]}|{t.group}", math.exp(th), math.exp(th - zq * se),
                             math.exp(th + zq * se)))
        if self.sigma is not None and self.family.has_disp and "betadisp" in p:
            i = ("betadisp", 0)
            se = math.sqrt(cov.loc[i, i])
            bd = float(p["betadisp"][0])
            sig = lambda v: float(eval_method(self.family, "sigma", v))
            lo, hi = sorted([sig(bd - zq * se), sig(bd + zq * se)])
            rows.append(("sigma", self.sigma, lo, hi))
        df = pd.DataFrame(rows, columns=["name", "estimate", "lower", "upper"]).set_index("name")
        if parm is not None:
            parm = [parm] if isinstance(parm, str) else list(parm)
            missing = [q for q in parm if q not in df.index]
            if missing:
                raise ValueError(f"parm names {missing} are not parameters; available: {list(df.index)}")
            df = df.loc[parm]
        return df

    # ------------------------------------------------------------ inference (tmbx.inference)
    def profile(self, parm=None, **kwargs):
        """Likelihood profiles (lme4's ``profile``): ``.table``, ``.confint(level)``, ``.plot()``."""
        from ..inference._profile import profile

        return profile(self, parm=parm, **kwargs)

    def bootstrap(self, nsim: int = 1000, fn=None, seed: int = 0, **kwargs):
        """Parametric bootstrap (bootMer, use.u=FALSE), all refits in one batch."""
        from ..inference._bootstrap import bootstrap

        return bootstrap(self, nsim=nsim, fn=fn, seed=seed, **kwargs)

    def anova(self, type=3, component="cond", ddf=None) -> pd.DataFrame:
        """Per-term tests: Wald chi-square (car::Anova) or, with ``ddf``, F tests (lmerTest)."""
        from ..inference._anova import anova_terms

        return anova_terms(self, type=type, component=component, ddf=ddf)

    def drop1(self, test="Chisq") -> pd.DataFrame:
        """Drop each droppable term and refit: Df, AIC, LRT, Pr(>Chi) (R's drop1)."""
        from ..inference._anova import drop1

        return drop1(self, test=test)

    def contrast(self, L, rhs=0, **kwargs):
        """Linear hypotheses L beta = rhs on the fixed effects (car::linearHypothesis)."""
        from ..inference._anova import contrast

        return contrast(self, L, rhs=rhs, **kwargs)

    def emmeans(self, specs, type="link", **kwargs):
        """Estimated marginal means over a factor (emmeans)."""
        from ..inference._emmeans import emmeans

        return emmeans(self, specs, type=type, **kwargs)

    def emtrends(self, specs, var, **kwargs):
        """Estimated marginal trends of a covariate (emmeans' emtrends)."""
        from ..inference._emmeans import emtrends

        return emtrends(self, specs, var, **kwargs)

    # ------------------------------------------------------------ checking (tmbx.diagnostics)
    def is_singular(self, tol: float = 1e-4) -> bool:
        """lme4's isSingular, on every random-effect term's relative covariance factor."""
        from ..diagnostics._singular import is_singular

        return is_singular(self, tol=tol)

    def rePCA(self) -> dict:
        """Principal components of each term's random-effect covariance (lme4::rePCA)."""
        from ..diagnostics._singular import rePCA

        return rePCA(self)

    def diagnose(self, **kwargs):
        """What may be wrong with this fit, and what to try (glmmTMB::diagnose)."""
        from ..diagnostics._diagnose import diagnose

        return diagnose(self, **kwargs)

    def allfit(self, **kwargs) -> pd.DataFrame:
        """Refit with every available optimizer and compare (lme4::allFit)."""
        from ..diagnostics._allfit import allfit

        return allfit(self, **kwargs)

    def r2(self) -> dict:
        """Nakagawa & Schielzeth R2: {"marginal", "conditional"} (performance::r2_nakagawa)."""
        from ..diagnostics._checks import r2

        return r2(self)

    def check_overdispersion(self) -> dict:
        from ..diagnostics._checks import check_overdispersion

        return check_overdispersion(self)

    def check_zeroinflation(self) -> dict:
        from ..diagnostics._checks import check_zeroinflation

        return check_zeroinflation(self)

    def simulate_residuals(self, nsim: int = 250, seed: int = 0, **kwargs):
        """DHARMa's scaled (quantile) residuals from simulations of the fit."""
        from ..diagnostics._residuals import simulate_residuals

        return simulate_residuals(self, nsim=nsim, seed=seed, **kwargs)

    def plot(self, **kwargs):
        """Diagnostic panel (residuals vs fitted, QQ, scale-location, random effects)."""
        from ..diagnostics._plots import plot_fit

        return plot_fit(self, **kwargs)

    def plot_ranef(self, **kwargs):
        """Caterpillar plot of the conditional modes with their intervals."""
        from ..diagnostics._plots import plot_ranef

        return plot_ranef(self, **kwargs)

    # ------------------------------------------------------------ beyond Laplace
    def sample(self, num_samples: int = 1000, num_chains: int = 4, seed: int = 0, laplace: bool = False,
               **kwargs):
        """NUTS on the posterior (latent effects too, or ``laplace=True``: the fixed
        parameters of the Laplace marginal, as tmbstan's ``laplace=TRUE``)."""
        from .._sampling import sample_glmm

        return sample_glmm(self, num_samples=num_samples, num_chains=num_chains, seed=seed,
                           laplace=laplace, **kwargs)

    # ------------------------------------------------------------ printing
    def summary(self) -> "Summary":
        return Summary(self)

    def __repr__(self):
        return (f"GlmmFit({self.formula!r}, family={self.family.name}, logLik={self.loglik:.4f}, "
                f"converged={self.converged})")


def _log_sd_positions(t):
    """(term index, theta position) of parameters that are log-sds of single terms."""
    name = t.struct.name
    if name in ("us", "diag", "cs", "toep", "hetar1"):
        return [(j, j) for j in range(t.k)]
    if name in ("homdiag", "homcs", "ar1", "ou", "exp", "gau", "mat", "homtoep") and t.k >= 1:
        return [(0, 0)]
    return []


class Summary:
    """glmmTMB-style summary; ``str()`` prints it, attributes hold the tables."""

    def __init__(self, fit: GlmmFit):
        self.fit = fit
        self.coefficients = {c: fit.coef_table(c) for c in fit.fixef if not (c == "disp" and fit.sigma is not None)}

    def __str__(self):
        f = self.fit
        fam = f.family
        lines = [f" Family: {fam.name}  ( {fam.link.name} )" if hasattr(fam, "link") else f" Family: {fam.name}",
                 f"Formula:          {f.formula}"]
        if "zi" in f.design.components:
            lines.append(f"Zero inflation:          {f.design.components['zi'].formula}")
        disp = f.design.components["disp"].formula
        if disp and disp.replace(" ", "") not in ("~1", ""):
            lines.append(f"Dispersion:              {disp}")
        lines.append("")
        crit = "REML criterion at convergence" if f.reml else None
        tab = pd.DataFrame({"AIC": [f.aic], "BIC": [f.bic], "logLik": [f.loglik], "deviance": [-2 * f.loglik],
                            "df.resid": [f.df_resid]})
        if crit:
            lines.append(f"{crit}: {-2 * f.loglik:.1f}")
        else:
            lines.append(tab.to_string(index=False, float_format=lambda v: f"{v:.1f}"))
        lines.append("")
        vc = f.varcorr
        if vc:
            lines.append("Random effects:")
            lines.append("")
            for title, table in (("Conditional model:", {k: v for k, v in vc.items() if k != "zi"}),
                                 ("Zero-inflation model:", vc.get("zi", {}))):
                if not table:
                    continue
                lines.append(title)
                rows = []
                for g, term in table.items():
                    for i, (name, sd) in enumerate(term.sd.items()):
                        corr = " ".join(f"{term.corr.iloc[i, j]:.3f}" for j in range(i)) if term.structure != "diag" else ""
                        rows.append((g if i == 0 else "", name, sd**2, sd, corr))
                if fam.name == "gaussian" and f.sigma is not None and title.startswith("Cond"):
                    rows.append(("Residual", "", f.sigma**2, f.sigma, ""))
                lines.append(pd.DataFrame(rows, columns=["Groups", "Name", "Variance", "Std.Dev.", "Corr"])
                             .to_string(index=False, float_format=lambda v: f"{v:.4g}"))
            ngrp = ", ".join(f"{t.group}, {t.m}" for t in f.template.terms if t.component == "cond")
            lines.append(f"Number of obs: {f.nobs}, groups:  {ngrp}")
            lines.append("")
        if fam.has_disp and f.sigma is not None and fam.name != "gaussian":
            lines.append(f"Dispersion parameter for {fam.name} family (): {f.sigma:.3g}")
            lines.append("")
        elif fam.name == "gaussian" and f.sigma is not None:
            lines.append(f"Dispersion estimate for gaussian family (sigma^2): {f.sigma**2:.4g}")
            lines.append("")
        titles = {"cond": "Conditional model:", "zi": "Zero-inflation model:", "disp": "Dispersion model:"}
        for comp, table in self.coefficients.items():
            lines.append(titles[comp])
            lines.append(table.to_string(float_format=lambda v: f"{v:.6g}"))
            lines.append("")
        if f.template.priors:
            lines.append("Posterior mode (MAP, no Jacobian) under the priors: " + str(f.template.priors)
                         + "; logLik, AIC and BIC include the log prior densities.")
        if not f.converged:
            lines.append(f"Warning: the fit did not converge: {f.message}")
        return "\n".join(lines)

    def __repr__(self):
        return str(self)
