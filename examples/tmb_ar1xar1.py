"""TMB's `ar1xar1` example in tmbx: a Poisson GMRF on a lattice.

eta (n1 x n2) ~ separable AR1(phi2) x AR1(phi1) with unit marginal variance
(TMB's ``SEPARABLE(AR1(phi2), AR1(phi1))``: AR1(phi1) along the first index),
N[i, j] ~ Poisson(exp(eta[i, j])), phi = tanh(transf_phi) (TMB's
``2 / (1 + exp(-2 x)) - 1``). The latent Hessian is a 9-point stencil: tmbx
reads the pattern off the template, colours it, and factorizes it as a
banded (block-tridiagonal) matrix, never as a dense 10,000 x 10,000 one.
"""

import math
import os

import jax.numpy as jnp
import numpy as np
import pandas as pd

import tmbx

HERE = os.path.dirname(os.path.abspath(__file__))


def ar1_whiten(x, phi, axis):
    """W x for the unit-variance AR1 precision Q = W'W along ``axis``."""
    x = jnp.moveaxis(x, axis, 0)
    first = x[:1]
    rest = (x[1:] - phi * x[:-1]) / jnp.sqrt(1 - phi**2)
    return jnp.moveaxis(jnp.concatenate([first, rest]), 0, axis)


def nll(p, d):
    n1, n2 = d["N"].shape
    eta = p["eta"]
    phi1, phi2 = jnp.tanh(p["transf_phi1"]), jnp.tanh(p["transf_phi2"])
    z = ar1_whiten(ar1_whiten(eta, phi1, 0), phi2, 1)
    logdet_q = -n2 * (n1 - 1) * jnp.log1p(-phi1**2) - n1 * (n2 - 1) * jnp.log1p(-phi2**2)
    gmrf = 0.5 * jnp.sum(z**2) - 0.5 * logdet_q + 0.5 * n1 * n2 * math.log(2 * math.pi)
    N = d["N"]
    pois = -jnp.sum(N * eta - jnp.exp(eta) - d["lgamma_N1"])
    return gmrf + pois


def lattice_data(N):
    from scipy.special import gammaln

    N = np.asarray(N, dtype=float)
    return dict(N=N, lgamma_N1=gammaln(N + 1))


def build_from_counts(N):
    data = lattice_data(N)
    start = math.atanh(0.5)
    params = dict(eta=np.zeros(N.shape), transf_phi1=start, transf_phi2=start)
    return tmbx.Model(nll, params, data=data, random=["eta"])


def build(path=None):
    df = pd.read_csv(path or os.path.join(HERE, "..", "tests", "data", "ar1xar1_50.csv"))
    n1, n2 = df["i"].max() + 1, df["j"].max() + 1
    N = np.zeros((n1, n2))
    N[df["i"], df["j"]] = df["N"]
    return build_from_counts(N)


def simulate_lattice(n, phi1=0.8, phi2=0.9, seed=0):
    """Simulate counts on an n x n lattice from the model (for benchmarks)."""
    rng = np.random.default_rng(seed)

    def ar1(n, phi, size):
        x = np.empty((n, size))
        x[0] = rng.normal(size=size)
        for t in range(1, n):
            x[t] = phi * x[t - 1] + math.sqrt(1 - phi**2) * rng.normal(size=size)
        return x

    eta = ar1(n, phi1, n)  # AR1 along the first index
    # AR1 along the second index of the already-correlated field
    out = np.empty_like(eta)
    out[:, 0] = eta[:, 0]
    for j in range(1, n):
        out[:, j] = phi2 * out[:, j - 1] + math.sqrt(1 - phi2**2) * ar1(n, phi1, 1)[:, 0]
    return rng.poisson(np.exp(out)).astype(float)


if __name__ == "__main__":
    model = build()
    fit = model.fit()
    print(fit, "layout:", model.laplace.layout.kind)
    print(fit.sdreport().summary().query("kind == 'fixed'"))
