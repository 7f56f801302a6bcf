"""Batch fitting (tmbx.glmm_batch, BatchFit.table, tmbx.power) against glmmTMB,
single fits and closed forms.

References: tests/data/genes_glmmtmb.json (glmmTMB 1.1.5 per gene of
tests/data/genes_ragged.csv, R's p.adjust BH; tests/reference_scripts/genes_*),
single-member fits of the same template, and the power of a two-sample z test.
"""

import json
import math
import os
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
import pytest
import scipy.stats as sst

import tmbx
from tmbx.formula._design import build_design
from tmbx.formula._template import _start_beta, build_template

HERE = os.path.dirname(os.path.abspath(__file__))
FORMULA = "y ~ group + (1|donor)"
R_NAMES = {"Intercept": "(Intercept)", "group[T.B]": "groupB"}


def make_genes(n_genes, n_cells, seed):
    """The reference generator, benchmarks/reference/make_genes_data.py (NB2 counts,
    random donor intercept per gene, 10 donors in two groups), run as the script."""
    script = os.path.join(os.path.dirname(HERE), "benchmarks", "reference", "make_genes_data.py")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "genes.csv")
        subprocess.run([sys.executable, script, str(n_genes), str(n_cells), out, str(seed)], check=True)
        return pd.read_csv(out)


# --------------------------------------------------------------------------- ragged genes vs glmmTMB
@pytest.fixture(scope="module")
def ragged():
    """16 genes of different sizes (one without donor d3), plus members that must be
    flagged: negative counts, all zeros, and an unused category of the by column."""
    d = pd.read_csv(os.path.join(HERE, "data", "genes_ragged.csv"))
    neg = d[d.gene == "g00001"].assign(gene="bad_negative")
    neg.loc[neg.index[:3], "y"] = -1
    zero = d[d.gene == "g00002"].assign(gene="bad_zero", y=0)
    d = pd.concat([d, neg, zero], ignore_index=True)
    d["gene"] = pd.Categorical(d["gene"], categories=sorted(d.gene.unique()) + ["unused"])
    return d


@pytest.fixture(scope="module")
def ragged_fits(ragged):
    return tmbx.glmm_batch(FORMULA, data=ragged, by="gene", family="nbinom2", progress=False)


@pytest.fixture(scope="module")
def glmmtmb():
    return json.load(open(os.path.join(HERE, "data", "genes_glmmtmb.json")))


def test_table_layout(ragged_fits, ragged):
    tab = ragged_fits.table()
    assert list(tab.index) == list(ragged.gene.cat.categories)
    assert tab.index.name == "gene"
    for col in ["converged", "message", "loglik", "beta:Intercept", "se:group[T.B]", "p:group[T.B]",
                "padj:group[T.B]", "sd:Intercept|donor", "disp"]:
        assert col in tab.columns


def test_bad_members_flagged(ragged_fits):
    tab = ragged_fits.table()
    assert not tab.loc["bad_negative", "converged"]
    assert "support" in tab.loc["bad_negative", "message"] and "non-negative" in tab.loc["bad_negative", "message"]
    assert "all responses are zero" in tab.loc["bad_zero", "message"]
    assert "no rows" in tab.loc["unused", "message"]
    assert np.isnan(tab.loc[["bad_negative", "bad_zero", "unused"], "loglik"]).all()
    with pytest.raises(KeyError, match="not fitted"):
        ragged_fits["bad_zero"]


def test_matches_glmmtmb(ragged_fits, glmmtmb):
    """Every gene against glmmTMB 1.1.5: logLik 1e-4, fixed effects within 1e-3 of
    their SEs, SEs 1e-3 relative, donor sd (away from 0) and sigma 1e-3 relative, and
    the BH-adjusted p-values of R's p.adjust."""
    tab = ragged_fits.table()
    for gene, ref in glmmtmb["genes"].items():
        row = tab.loc[gene]
        assert row["converged"], gene
        assert abs(row["loglik"] - ref["logLik"]) < 1e-4, gene
        for name, rname in R_NAMES.items():
            se = ref["se"][rname]
            assert abs(row[f"beta:{name}"] - ref["fixef"][rname]) < 1e-3 * se, (gene, name)
            assert row[f"se:{name}"] == pytest.approx(se, rel=1e-3), (gene, name)
            assert row[f"padj:{name}"] == pytest.approx(ref["padj"][rname], rel=2e-3, abs=1e-12), (gene, name)
        if ref["sd_donor"] > 0.05:
            assert row["sd:Intercept|donor"] == pytest.approx(ref["sd_donor"], rel=1e-3), gene
        else:
            assert row["sd:Intercept|donor"] < 0.05, gene
        assert row["disp"] == pytest.approx(ref["sigma"], rel=1e-3), gene


def test_member_equals_single_fit(ragged_fits, ragged):
    """g00003 (fewest donors, padded rows and a padded level slot in the batch) fitted
    alone by tmbx.glmm: same log-likelihood (1e-6), estimates, summary and vcov."""
    gene = "g00003"
    rows = ragged[ragged.gene == gene]
    single = tmbx.glmm(FORMULA, data=rows, family="nbinom2")
    member = ragged_fits[gene]
    assert member.loglik == pytest.approx(single.loglik, abs=1e-6)
    se = single.se()["cond"]
    assert np.all(np.abs(member.fixef["cond"] - single.fixef["cond"]) < 1e-3 * se)
    np.testing.assert_allclose(member.vcov()["cond"].to_numpy(), single.vcov()["cond"].to_numpy(), rtol=1e-3)
    assert member.sigma == pytest.approx(single.sigma, rel=1e-4)
    assert member.nobs == single.nobs == len(rows)
    ct = member.summary().coefficients["cond"]
    np.testing.assert_allclose(ct["Pr(>|z|)"], single.summary().coefficients["cond"]["Pr(>|z|)"], rtol=1e-3)
    tab = ragged_fits.table()
    assert tab.loc[gene, "loglik"] == pytest.approx(single.loglik, abs=1e-6)
    np.testing.assert_allclose(member.ranef(condVar=False)["donor"].to_numpy(),
                               single.ranef(condVar=False)["donor"].to_numpy(), atol=1e-4)


def test_bad_input():
    d = pd.read_csv(os.path.join(HERE, "data", "genes_ragged.csv"))
    with pytest.raises(ValueError, match="by='genes' is not a column"):
        tmbx.glmm_batch(FORMULA, data=d, by="genes", family="nbinom2")
    with pytest.raises(ValueError, match="reml"):
        tmbx.glmm_batch(FORMULA, data=d, by="gene", reml=True)
    with pytest.raises(ImportError, match="pip install ray"):
        tmbx.glmm_batch(FORMULA, data=d[d.gene == "g00000"], by="gene", family="nbinom2", backend="ray",
                        progress=False)


# --------------------------------------------------------------------------- shared cells: genes
@pytest.fixture(scope="module")
def genes():
    return make_genes(30, 500, seed=3)


@pytest.fixture(scope="module")
def genes_fits(genes):
    return tmbx.glmm_batch(FORMULA, data=genes, by="gene", family="nbinom2", batch_size=8, progress=False)


def _single_fits(data, genes):
    """Each gene fitted alone with tmbx.glmm's template and start values; the genes
    share their cells, so one template (one compiled single fit) serves them all."""
    first = data[data.gene == genes[0]]
    tmpl = build_template(build_design(FORMULA, first), "nbinom2")
    model = tmpl.model
    sp = model.space
    out = {}
    for g in genes:
        y = data.loc[data.gene == g, "y"].to_numpy(float)
        if not np.any(y):
            continue
        d = dict(model.data, y=jnp.asarray(y))
        p = {k: sp.starts[k].reshape(sp.shapes[k]) for k in sp.names}
        p["beta"] = _start_beta(tmpl.family, tmpl.design.components["cond"], y, None)
        res = jax.tree_util.tree_map(np.asarray, model._fit_core(jnp.asarray(sp.flatten(p, "x")),
                                                                 jnp.asarray(sp.start("u")), d))
        out[g] = res
    return tmpl, out


def _compare_with_singles(fits, data, genes):
    tmpl, singles = _single_fits(data, genes)
    tab = fits.table()
    n_checked = 0
    for g, res in singles.items():
        row = tab.loc[g]
        H = 0.5 * (res["hessian"] + res["hessian"].T)
        sd = math.exp(res["x"][tmpl.model.space.index["theta"][0]])
        disp = math.exp(res["x"][tmpl.model.space.index["betadisp"][0]])
        # at a boundary (sd -> 0, or theta -> inf: the Poisson limit) the likelihood is
        # flat in one direction and two optimizers stop at slightly different points
        boundary = sd < 0.05 or disp > 1e3 or np.linalg.eigvalsh(H).min() <= 0 or not row["converged"]
        assert row["loglik"] == pytest.approx(-float(res["f"]), abs=1e-4 if boundary else 1e-6), g
        if boundary:
            continue
        se = np.sqrt(np.diag(np.linalg.inv(H)))
        beta = res["x"][tmpl.model.space.index["beta"]]
        for j, name in enumerate(tmpl.names["beta"]):
            assert abs(row[f"beta:{name}"] - beta[j]) < 1e-3 * se[j], (g, name)
            # finite-difference Hessians at optima 1e-3 SEs apart
            assert row[f"se:{name}"] == pytest.approx(se[j], rel=1e-2), (g, name)
        n_checked += 1
    assert n_checked >= len(singles) // 2


def test_genes_equal_single_fits(genes_fits, genes):
    ids = list(genes.gene.unique())
    # genes whose dispersion runs to infinity (Poisson limit) may end with a flat,
    # non-positive-definite Hessian: flagged, with the same log-likelihood
    assert genes_fits.table()["converged"].mean() >= 0.9
    _compare_with_singles(genes_fits, genes, ids[:12])


@pytest.mark.slow
def test_200_genes_equal_single_fits():
    data = make_genes(200, 500, seed=5)
    fits = tmbx.glmm_batch(FORMULA, data=data, by="gene", family="nbinom2", progress=False)
    tab = fits.table()
    assert tab["converged"].mean() > 0.95
    _compare_with_singles(fits, data, list(data.gene.unique()))


def test_bh_adjust_matches_definition(genes_fits):
    """BH over the members with a finite p-value (R's p.adjust drops NAs the same way)."""
    tab = genes_fits.table()
    p_all = tab["p:group[T.B]"].to_numpy()
    ok = np.isfinite(p_all)
    p = p_all[ok]
    order = np.argsort(p)
    m = len(p)
    adj = np.minimum.accumulate((p[order] * m / np.arange(1, m + 1))[::-1])[::-1]
    expect = np.full(len(p_all), np.nan)
    expect[np.flatnonzero(ok)[order]] = np.minimum(adj, 1)
    np.testing.assert_allclose(tab["padj:group[T.B]"], expect, rtol=1e-12)


def test_dask_backend_same_table(genes_fits, genes):
    """Two in-process Dask workers: the same table as the single-process run."""
    pytest.importorskip("dask.distributed")
    fits = tmbx.glmm_batch(FORMULA, data=genes, by="gene", family="nbinom2", batch_size=8, backend="dask",
                           progress=False)
    a, b = genes_fits.table(), fits.table()
    pd.testing.assert_frame_equal(a, b, check_exact=False, rtol=1e-10)


# --------------------------------------------------------------------------- template API
def test_template_batch_table():
    """model.simulate + model.fit_batch + BatchFit.table: a normal mean and log-sd per
    data set; se of the mean against the closed form sd/sqrt(n) at the estimates."""
    n = 40

    def nll(p, d):
        return -jnp.sum(jax.scipy.stats.norm.logpdf(d["y"], p["mu"], jnp.exp(p["logsd"])))

    def sim(p, d, key):
        return {"y": p["mu"] + jnp.exp(p["logsd"]) * jax.random.normal(key, (n,))}

    model = tmbx.Model(nll, {"mu": 0.5, "logsd": 0.0}, data={"y": jnp.zeros(n)}, simulate=sim)
    sims = model.simulate(nsim=50, seed=0)
    assert sims["y"].shape == (50, n)
    tab = model.fit_batch(sims).table()
    assert list(tab.columns[:3]) == ["converged", "message", "loglik"]
    y = np.asarray(sims["y"])
    np.testing.assert_allclose(tab["est:mu"], y.mean(1), atol=1e-6)
    np.testing.assert_allclose(tab["se:mu"], y.std(1) / math.sqrt(n), rtol=1e-3)
    assert tab["padj:mu"].min() >= tab["p:mu"].min()


# --------------------------------------------------------------------------- power
def test_power_two_group_closed_form():
    """Gaussian LMM, group balanced within each of 40 clusters of 20: the group
    contrast is free of the cluster effects, var = 4 sigma^2 / N, and the Wald z test
    with ML's sigma estimate (SSW / (N - m), df N - m - 1) has the power of a
    noncentral t; simulated power agrees within 3 Monte Carlo SEs."""
    m, k = 40, 20
    design = pd.DataFrame({"g": np.repeat([f"c{i}" for i in range(m)], k),
                           "group": np.tile(["A", "B"], m * k // 2)})
    N = m * k
    se = math.sqrt(4 / N)
    res = tmbx.power("y ~ group + (1|g)", design, "gaussian", fixef={"Intercept": 1.0, "group[T.B]": 0.0},
                     sd={"g": 0.5}, disp=1.0, test="group[T.B]", effect=[0.0, 0.15], nsim=300, seed=1,
                     progress=False)
    tab = res.table
    df = N - m - 1
    c = sst.norm.ppf(0.975) * math.sqrt(df / (N - m))
    for delta in (0.0, 0.15):
        lam = delta / se
        expect = sst.nct.sf(c, df, lam) + sst.nct.cdf(-c, df, lam)
        row = tab.loc[delta]
        assert row["fitted"] >= 295
        assert abs(row["power"] - expect) < 3 * math.sqrt(expect * (1 - expect) / row["fitted"]) + 1e-3, (delta, expect)
        assert row["lower"] <= row["power"] <= row["upper"]
    fig = res.plot()
    assert fig is not None


def test_shared_design_members_merge_and_flag_as_one_by_one(genes):
    """Members measured on the same cells take the vectorized path (one sort for
    all, support checked at once): the same merged rows as member-by-member
    merging, and a member outside the support or all zero flagged as in the
    general path."""
    from tmbx.batch import _glmm_batch as gb
    from tmbx.batch import _layout

    d = genes.copy()
    first, second = d.gene.unique()[:2]
    d.loc[d.index[d.gene == first][:2], "y"] = -1
    d.loc[d.gene == second, "y"] = 0
    fam = tmbx.families.get("nbinom2")
    call = dict(formula=FORMULA, family="nbinom2", ziformula=None, dispformula=None, weights=None, offset=None)
    keys, groups = gb._split(d, "gene")
    assert gb._shared_columns(call, d, "gene", groups)
    source, members, flags = gb._members(call, d, "gene", keys, groups, fam)
    assert "support" in flags[first] and "all responses are zero" in flags[second]
    assert set(members) == set(keys) - {first, second}
    level = _layout.single_factor(source)
    pattern = _layout.row_patterns(source, level)
    Y = np.stack([y for _, y in members.values()])
    Y[0, :7] = np.arange(7) * 100  # large counts: the sort key's span
    for m, got in zip(range(len(Y)), _layout.merge_shared_rows(Y, pattern, level)):
        want = _layout.merge_rows(np.arange(len(Y[m])), Y[m], pattern, level)
        assert np.array_equal(pattern[got.rows], pattern[want.rows])  # the same design rows
        for f in ("y", "count", "slot", "within", "levels", "M", "R"):
            assert np.array_equal(getattr(got, f), getattr(want, f)), (m, f)
    # non-integer responses fall back to one member at a time
    frac = _layout.merge_shared_rows(Y[:2] + 0.5, pattern, level)
    assert np.array_equal(frac[1].y, _layout.merge_rows(np.arange(Y.shape[1]), Y[1] + 0.5, pattern, level).y)


def test_shape_classes_group_where_padding_is_cheaper_than_a_program():
    from collections import Counter

    from tmbx.batch import _glmm_batch as gb

    def group(spec):
        shapes = {}
        for shp, n in spec:
            shapes.update({len(shapes) + i: shp for i in range(n)})
        return Counter(gb._merge_small(shapes).values())

    row = gb._ROW_SECONDS
    # cheap padding (100 members x 40 rows more) joins; costly padding keeps its own program
    cheap = int(0.5 * gb._BUCKET_SECONDS / (100 * 40 * row))
    assert group([((10, 4), 100), ((10, 8), cheap)]) == {(10, 8): 100 + cheap}
    costly = int(3 * gb._BUCKET_SECONDS / (40 * row))
    assert group([((10, 4), costly), ((10, 8), 50)]) == {(10, 4): costly, (10, 8): 50}
    # a class too small for a program of its own joins the next one up, even at a cost
    assert group([((10, 4), 3), ((10, 400), 50)]) == {(10, 400): 53}
    # ... but never one that cannot hold it (fewer levels)
    assert group([((10, 4), 3), ((5, 64), 50)]) == {(10, 4): 3, (5, 64): 50}
