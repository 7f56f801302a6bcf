"""TMB's `simple` example in tmbx: a linear mixed model with crossed effects.

x ~ N(A beta + B u, exp(logsd0)^2), u ~ N(0, exp(logsdu)^2), with
A = model.matrix(~ factor(period) - 1), B = model.matrix(~ factor(year) + factor(quarter) - 1).
Reports sd0 = exp(logsd0) and sum(exp(u)) with delta-method standard errors (ADREPORT).
"""

import os

import jax.numpy as jnp
import numpy as np
import pandas as pd

import tmbx

HERE = os.path.dirname(os.path.abspath(__file__))


def load(path=None):
    path = path or os.path.join(HERE, "..", "tests", "data", "simple.csv")
    df = pd.read_csv(path)
    period = pd.Categorical(df["period"]).codes
    year = pd.Categorical(df["year"]).codes
    quarter = pd.Categorical(df["quarter"]).codes
    nyear = year.max() + 1
    return dict(
        x=jnp.asarray(df["x"].to_numpy()),
        period=jnp.asarray(period),
        year=jnp.asarray(year),
        # B's columns: all years, then quarters 2..4 (R's model.matrix drops the
        # second factor's first level); quarter 1 points at a zero effect
        quarter=jnp.asarray(np.where(quarter > 0, nyear + quarter - 1, -1)),
    ), int(nyear + quarter.max()), int(period.max() + 1)


def nll(p, d):
    q = d["quarter"]
    mu = p["beta"][d["period"]] + p["u"][d["year"]] + jnp.where(q >= 0, p["u"][q], 0.0)
    sd0, sdu = jnp.exp(p["logsd0"]), jnp.exp(p["logsdu"])
    lik = -jnp.sum(-0.5 * ((d["x"] - mu) / sd0) ** 2 - jnp.log(sd0) - 0.5 * jnp.log(2 * jnp.pi))
    prior = -jnp.sum(-0.5 * (p["u"] / sdu) ** 2 - jnp.log(sdu) - 0.5 * jnp.log(2 * jnp.pi))
    return lik + prior


def report(p, d):
    return {"sd0": jnp.exp(p["logsd0"]), "sum(exp(u))": jnp.sum(jnp.exp(p["u"]))}


def build(path=None):
    data, nu, nbeta = load(path)
    params = {"u": jnp.zeros(nu), "beta": jnp.zeros(nbeta), "logsd0": 0.0, "logsdu": 0.0}
    return tmbx.Model(nll, params, data=data, random=["u"], report=report)


if __name__ == "__main__":
    fit = build().fit()
    rep = fit.sdreport()
    print(fit)
    print(rep.summary().query("kind != 'random'"))
