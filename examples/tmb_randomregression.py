"""TMB's `randomregression` example in tmbx: random intercepts and slopes.

a_j ~ N(mu[0], sigma[0]), b_j ~ N(mu[1], sigma[1]) for groups j, and
x_i ~ N(a_{g_i} t_i + b_{g_i}, sigma0). As in TMB's template the standard
deviations are parameters on the natural scale (start 1).
"""

import os

import jax.numpy as jnp
import jax.scipy.stats as jst
import numpy as np
import pandas as pd

import tmbx

HERE = os.path.dirname(os.path.abspath(__file__))


def nll(p, d):
    g = d["group"]
    mean = p["a"][g] * d["t"] + p["b"][g]
    out = -jnp.sum(jst.norm.logpdf(p["a"], p["mu"][0], p["sigma"][0]))
    out -= jnp.sum(jst.norm.logpdf(p["b"], p["mu"][1], p["sigma"][1]))
    return out - jnp.sum(jst.norm.logpdf(d["x"], mean, p["sigma0"]))


def build(path=None):
    df = pd.read_csv(path or os.path.join(HERE, "..", "tests", "data", "randomregression.csv"))
    g = df["group"].to_numpy()
    ng = int(g.max()) + 1
    data = dict(x=df["x"].to_numpy(), t=df["t"].to_numpy(), group=g)
    params = dict(a=np.zeros(ng), b=np.zeros(ng), mu=np.zeros(2), sigma=np.ones(2), sigma0=1.0)
    return tmbx.Model(nll, params, data=data, random=["a", "b"])


if __name__ == "__main__":
    fit = build().fit()
    print(fit)
    print(fit.sdreport().summary().query("kind == 'fixed'"))
