"""Small shared helpers: host-to-device conversion, sorted unique keys, and the
compiler options chosen per model size."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tmbx
from tmbx._config import compile_options
from tmbx._internal import _method_program, eval_method, to_device, unique_sorted


def test_unique_sorted_matches_numpy_unique():
    rng = np.random.default_rng(0)
    for x in (rng.integers(0, 50, 1000), rng.integers(0, 2**40, 5000), np.array([], np.int64),
              np.array([7]), rng.normal(size=100).round(1)):
        np.testing.assert_array_equal(unique_sorted(x), np.unique(x))


def test_to_device_keeps_values_and_dtypes():
    cases = [(np.arange(5), None, jnp.int64), (np.arange(5), np.int32, jnp.int32),
             (np.ones((2, 3)), None, jnp.float64), ([1.5, 2.5], np.float64, jnp.float64),
             (np.array([True, False]), None, jnp.bool_)]
    for a, dtype, want in cases:
        out = to_device(a, dtype)
        assert isinstance(out, jax.Array) and out.dtype == want
        np.testing.assert_array_equal(np.asarray(out), np.asarray(a))
    # JAX arrays and tracers pass through jnp.asarray (inside a trace too)
    assert to_device(jnp.ones(3), np.int32).dtype == jnp.int32
    assert float(jax.jit(lambda v: jnp.sum(to_device(v) * 2))(jnp.ones(3))) == 6.0


def test_eval_method_matches_eager_and_compiles_once_per_shape():
    """A structure's method through `eval_method` equals its eager value (NumPy out),
    and a second call of the same type, method and shapes reuses the program."""
    from tmbx.covstructs import corr_to_theta, get

    us = get("us", dim=3)
    sd = np.array([0.5, 1.5, 2.0])
    corr = np.array([[1.0, 0.3, -0.2], [0.3, 1.0, 0.4], [-0.2, 0.4, 1.0]])
    theta = np.concatenate([np.log(sd), corr_to_theta(corr)])  # glmmTMB's put_cor
    out = eval_method(us, "cov", theta)
    assert isinstance(out, np.ndarray)
    np.testing.assert_allclose(out, sd[:, None] * corr * sd[None, :], rtol=1e-12)
    before = _method_program()._cache_size()
    eval_method(us, "cov", theta + 1.0)
    assert _method_program()._cache_size() == before
    fam = tmbx.families.Gamma(link="log")
    assert float(eval_method(fam.link, "__call__", 2.0)) == pytest.approx(np.log(2.0), rel=1e-15)


def test_compile_options_by_model_size(monkeypatch):
    monkeypatch.delenv("TMBX_FAST_COMPILE", raising=False)
    assert compile_options({"y": np.zeros(100)}, 10) == {"xla_backend_optimization_level": 0}
    assert compile_options({"y": np.zeros(10**6)}, 10) is None
    assert compile_options({"y": np.zeros(100)}, 10**5) is None
    monkeypatch.setenv("TMBX_FAST_COMPILE", "0")
    assert compile_options({"y": np.zeros(100)}, 10) is None
    monkeypatch.setenv("TMBX_FAST_COMPILE", "1")
    assert compile_options({"y": np.zeros(10**6)}, 10**5) == {"xla_backend_optimization_level": 0}


@pytest.mark.parametrize("fast", ["0", "1"])
def test_a_fit_is_the_same_at_either_optimization_level(fast, monkeypatch):
    """XLA's optimization level changes compile time and speed, never the answer."""
    monkeypatch.setenv("TMBX_FAST_COMPILE", fast)
    fit = tmbx.glmm("cbind(incidence, size - incidence) ~ period + (1|herd)",
                    data=tmbx.load_dataset("cbpp"), family="binomial")
    assert fit.loglik == pytest.approx(-92.02628, abs=1e-4)  # glmmTMB 1.1.5 (cases/cbpp_binomial)


@pytest.mark.parametrize("formula, kw", [
    ("count ~ spp + mined + (1|site)", dict(family="nbinom2", ziformula="~mined + (1|site)")),
    ("count ~ mined + (1 + mined|site) + (1|spp)", dict(family="poisson", reml=True)),
])
def test_formula_latent_hessian_is_diagonal_as_declared(formula, kw):
    """Formula models declare their latent Hessian diagonal (spherical random
    effects) and skip asdex's detection: the detected pattern must agree, and so
    must the values."""
    import asdex

    from tmbx.formula._design import build_design
    from tmbx.formula._template import build_template, resolve_family

    df = tmbx.load_dataset("salamanders")
    fam = kw.pop("family")
    design = build_design(formula, df, ziformula=kw.pop("ziformula", None))
    template = build_template(design, resolve_family(fam, "zi" in design.components), **kw)
    model = template.model
    lat = model.laplace.hessian.lat
    sp = model.space
    x0, u0 = jnp.asarray(sp.start("x")), jnp.asarray(sp.start("u")) + 0.1
    g = lambda u: model._laplace_args[0].latent_nll(sp.unflatten(x0, u), model.data)
    detected = asdex.hessian_sparsity(g, u0)
    rows, cols = np.asarray(detected.rows), np.asarray(detected.cols)
    assert np.all(rows == cols)
    full = np.asarray(jax.hessian(g)(u0))
    np.testing.assert_allclose(np.asarray(lat(x0, u0, model.data)), np.diagonal(full), atol=1e-12)
    assert np.count_nonzero(full - np.diag(np.diagonal(full))) == 0
