"""`GlmmBatchFit`: the result of `tmbx.glmm_batch`."""

from __future__ import annotations

import dataclasses

import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd

from ..formula._parse import suggest
from ._layout import MemberRows
from ._run import bucket_model
from ._table import bh_adjust, covariances, member_status, wald_columns

_COMPONENTS = (("beta", ""), ("betazi", "zi~"), ("betadisp", "disp~"))


@dataclasses.dataclass
class Member:
    """Where a fitted member's results live: bucket, position, its merged rows."""

    bucket: int
    pos: int
    rows: MemberRows | None  # None: the member's rows are the design's (no merging)


class GlmmBatchFit:
    """Fits of one formula to many members; ``table()`` summarizes them, ``fits[key]``
    gives one member's `GlmmFit`."""

    def __init__(self, keys, by, call, family, source, buckets, results, placed, flags, data, groups):
        self.keys = list(keys)
        self.by = by
        self.call = call
        self.family = family
        self.source = source
        self.buckets = buckets
        self.results = results
        self.placed = placed
        self.flags = flags
        self._data = data
        self._groups = dict(zip(self.keys, groups))
        self._table = None

    def __len__(self):
        return len(self.keys)

    def __iter__(self):
        return iter(self.keys)

    def __repr__(self):
        n_fit = len(self.placed)
        n_conv = int(self.table()["converged"].sum())
        return (f"GlmmBatchFit({self.call['formula']!r}, family={self.family.name}, by={self.by!r}: "
                f"{len(self)} members, {n_fit} fitted, {n_conv} converged, {len(self.flags)} flagged)")

    # ------------------------------------------------------------ the table
    def table(self) -> pd.DataFrame:
        """One row per member (glmmTMB's summary for each, side by side): converged,
        message, loglik, beta:NAME, se:NAME, p:NAME (Wald z), padj:NAME
        (Benjamini-Hochberg across members, per coefficient), sd:TERM|GROUP,
        disp (glmmTMB's ``sigma()``). Flagged members: the reason, NaN elsewhere."""
        if self._table is not None:
            return self._table.copy()
        parts = [self._bucket_table(i) for i in range(len(self.buckets))]
        fitted = pd.concat(parts) if parts else pd.DataFrame()
        flagged = pd.DataFrame({"converged": False, "message": list(self.flags.values())},
                               index=list(self.flags))
        tab = pd.concat([fitted, flagged]).reindex(self.keys)
        tab.index.name = self.by
        for c in [c for c in tab.columns if c.startswith("p:")]:
            tab["padj:" + c[2:]] = bh_adjust(tab[c].to_numpy())
        tab["converged"] = tab["converged"].astype(bool)
        self._table = tab
        return tab.copy()

    def _bucket_table(self, i) -> pd.DataFrame:
        tmpl, _ = bucket_model(self.buckets[i].spec)
        res = self.results[i]
        sp = tmpl.model.space
        conv, msg, pd_ok = member_status(tmpl.model, res)
        X = np.asarray(res["x"])
        V = covariances(np.asarray(res["hessian"]), pd_ok)
        var = np.diagonal(V, axis1=1, axis2=2)
        cols = {"converged": conv, "message": msg, "loglik": -np.asarray(res["f"])}
        for key, prefix in _COMPONENTS:
            if key not in tmpl.names or key in sp.random or (key == "betadisp" and self._sigma_only(tmpl)):
                continue
            pos = sp.index[key]
            names = [prefix + n for n in tmpl.names[key]]
            est = np.where(pos >= 0, X[:, np.maximum(pos, 0)], sp.starts[key])
            se = np.where(pos >= 0, np.sqrt(np.clip(var[:, np.maximum(pos, 0)], 0, None)), np.nan)
            se = np.where(np.isnan(var[:, np.maximum(pos, 0)]), np.nan, se)
            cols.update(wald_columns(names, est, se))
        cols.update(self._variance_columns(tmpl, X))
        return pd.DataFrame(cols, index=self.buckets[i].keys)

    def _sigma_only(self, tmpl) -> bool:
        """dispformula ~1: the dispersion is reported as glmmTMB's sigma() ("disp")."""
        return tmpl.design.components["disp"].intercept_only

    def _variance_columns(self, tmpl, X) -> dict:
        entry = _VARIANCE_FNS.get(id(tmpl))
        if entry is None:
            # one jitted program per template (kept with it): run eagerly, the vmapped
            # structure and family code dispatched op by op and took seconds per call
            names, fn = _variance_fn(tmpl, self.family, self._sigma_only(tmpl))
            entry = names, jax.jit(jax.vmap(fn))
            _VARIANCE_FNS[id(tmpl)] = entry
            weakref.finalize(tmpl, _VARIANCE_FNS.pop, id(tmpl), None)
        names, fn = entry
        return {k: np.asarray(v, float) for k, v in zip(names, fn(jnp.asarray(X)))}

    @property
    def converged(self) -> pd.Series:
        return self.table()["converged"]

    @property
    def loglik(self) -> pd.Series:
        return self.table()["loglik"]

    # ------------------------------------------------------------ one member
    def __getitem__(self, key):
        """The member's full fit (a `GlmmFit`, as `tmbx.glmm` on its rows returns)."""
        if key in self.flags:
            raise KeyError(f"member {key!r} was not fitted: {self.flags[key]}")
        if key not in self.placed:
            raise KeyError(f"{key!r} is not a value of {self.by!r}.{suggest(str(key), map(str, self.keys))}")
        from .._model import Fit
        from ..formula._design import build_design
        from ..formula._fit import GlmmFit
        from ..formula._template import build_template

        m = self.placed[key]
        if self._data is None:
            raise KeyError("this batch has no data frame per member (simulated responses); refit one with tmbx.glmm")
        frame = self._data.iloc[self._groups[key]]
        c = self.call
        design = build_design(c["formula"], frame, ziformula=c["ziformula"], dispformula=c["dispformula"],
                              weights=c["weights"], offset=c["offset"],
                              family_needs_trials=getattr(self.family, "needs_trials", False))
        tmpl = build_template(design, self.family)
        res = {k: v[m.pos] for k, v in self.results[m.bucket].items()}
        res["u"] = self._member_u(tmpl, m, res["u"])
        fit = Fit(tmpl.model, tmpl.model.data, res)
        call = dict(formula=c["formula"], family=c["family"], ziformula=c["ziformula"],
                    dispformula=c["dispformula"], reml=False, weights=c["weights"], offset=c["offset"],
                    start=None, map=None, na_action="omit", layout=None, priors=None, nagq=1, data=frame)
        return GlmmFit(tmpl, fit, c["formula"], call)

    def _member_u(self, tmpl, m: Member, u_canon):
        """The random effects from the bucket's level slots to the member's own levels."""
        if m.rows is None:
            return u_canon
        canon, _ = bucket_model(self.buckets[m.bucket].spec)
        sp_c, sp_m = canon.model.space, tmpl.model.space
        u = np.zeros(sp_m.n_u)
        for tc, tm in zip(canon.terms, tmpl.terms):
            key = "b" if tc.component == "cond" else "bzi"
            src = u_canon[sp_c.index[key][tc.b_slice]].reshape(tc.m, tc.k)
            slot = {tm_label: j for j, tm_label in enumerate(self._slot_labels(tc, m))}
            dst = sp_m.index[key][tm.b_slice].reshape(tm.m, tm.k)
            for i, label in enumerate(tm.levels):
                u[dst[i]] = src[slot[label]]
        return u

    def _slot_labels(self, term, m: Member):
        src_term = next(t for c in self.source.components.values() for t in c.re if t.group == term.group)
        return [src_term.levels[j] for j in m.rows.levels]


_VARIANCE_FNS: dict = {}


def _variance_fn(tmpl, fam, sigma_only: bool):
    """Column names ("sd:TERM|GROUP", ..., "disp") and ``x -> tuple`` of their values
    for one member's parameter vector."""
    sp = tmpl.model.space
    names = [f"sd:{'' if t.component == 'cond' else 'zi~'}{name}|{t.group}" for t in tmpl.terms for name in t.terms]
    with_disp = fam.has_disp and sigma_only
    if with_disp:
        names.append("disp")

    def fn(x):
        p = sp.unflatten(x, jnp.zeros(sp.n_u))
        out = []
        for t in tmpl.terms:
            th = p["theta" if t.component == "cond" else "thetazi"][t.theta_slice]
            sd = jnp.sqrt(jnp.clip(jnp.diagonal(t.struct.cov(th)), 0, None))
            out += [sd[j] for j in range(t.k)]
        if with_disp:
            psi = p.get("psi")
            out.append(fam.sigma(p["betadisp"][0], psi) if psi is not None else fam.sigma(p["betadisp"][0]))
        return tuple(out)

    return names, fn
