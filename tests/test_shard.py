"""Rows split across devices (`tmbx.shard_rows`, ``tmbx.glmm(devices=...)``).

JAX fixes its device count when it starts, so the checks run in a fresh
process with four host devices (``XLA_FLAGS=--xla_force_host_platform_device_count=4``):
a sharded fit must equal the one-device fit, hold a quarter of the rows on
each device, and sum over rows with collectives in its compiled program.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import tmbx

SCRIPT = r"""
import json, warnings
import jax, numpy as np, pandas as pd
import tmbx

rng = np.random.default_rng(4)
def frame(n, groups=150):
    g = rng.integers(0, groups, n)
    x = rng.normal(size=n)
    y = rng.poisson(np.exp(0.2 + 0.4 * x + 0.6 * rng.normal(size=groups)[g]))
    return pd.DataFrame(dict(y=y, x=x, g=[f"g{i}" for i in g]))

out = {"devices": len(jax.devices())}
df = frame(4000)
one = tmbx.glmm("y ~ x + (1|g)", data=df, family="poisson")
four = tmbx.glmm("y ~ x + (1|g)", data=df, family="poisson", devices=4)
out["loglik"] = [one.loglik, four.loglik]
out["fixef"] = [one.fixef["cond"].tolist(), four.fixef["cond"].tolist()]
out["se"] = [np.sqrt(np.diag(one.vcov()["cond"])).tolist(), np.sqrt(np.diag(four.vcov()["cond"])).tolist()]
out["sd"] = [float(one.varcorr["g"].sd.iloc[0]), float(four.varcorr["g"].sd.iloc[0])]
y = four.model.data["y"]
out["y_shards"] = sorted(s.data.shape[0] for s in y.addressable_shards)
out["y_devices"] = len(y.sharding.device_set)
m = four.model
hlo = m._value_grad.lower(jax.numpy.asarray(four._fit.x), m._u_last, m.data).compile().as_text()
out["all_reduce"] = "all-reduce" in hlo
# 4002 rows: split over 3 of the 4 devices (4002 = 2 x 3 x 23 x 29), with a warning
df2 = frame(4002)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    three = tmbx.glmm("y ~ x + (1|g)", data=df2, family="poisson", devices=4)
out["uneven_warning"] = any("using 3" in str(w.message) for w in caught)
out["uneven_devices"] = len(three.model.data["y"].sharding.device_set)
out["uneven_converged"] = bool(three.converged) if hasattr(three, "converged") else bool(three._fit.converged)
try:
    tmbx.shard_rows({"y": np.zeros(10)}, 10, devices=4)
    out["refused"] = ""
except ValueError as e:
    out["refused"] = str(e)
print("RESULT" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def sharded():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    run = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env,
                         timeout=900, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    line = next((l for l in run.stdout.splitlines() if l.startswith("RESULT")), None)
    assert line is not None, run.stdout[-3000:] + run.stderr[-3000:]
    return json.loads(line[len("RESULT"):])


def test_a_fit_split_over_four_devices_equals_the_one_device_fit(sharded):
    assert sharded["devices"] == 4
    one, four = sharded["loglik"]
    assert four == pytest.approx(one, abs=1e-8)
    np.testing.assert_allclose(sharded["fixef"][1], sharded["fixef"][0], rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(sharded["se"][1], sharded["se"][0], rtol=1e-5)
    assert sharded["sd"][1] == pytest.approx(sharded["sd"][0], rel=1e-6)


def test_each_device_holds_its_rows_and_sums_are_collective(sharded):
    assert sharded["y_devices"] == 4
    assert sharded["y_shards"] == [1000, 1000, 1000, 1000]
    assert sharded["all_reduce"]


def test_rows_that_do_not_split_evenly(sharded):
    assert sharded["uneven_warning"] and sharded["uneven_devices"] == 3
    assert sharded["uneven_converged"]
    assert "do not split evenly over 4 devices" in sharded["refused"] and "use 2 of the devices" in sharded["refused"]


def test_split_devices_and_bad_counts():
    import jax

    n = len(jax.devices())
    assert len(tmbx.split_devices(7, n)) == (7 if n >= 7 else 1)
    assert len(tmbx.split_devices(6, n)) == max(d for d in (1, 2, 3, 6) if d <= n)
    with pytest.raises(ValueError, match="device"):
        tmbx.shard_rows({"y": np.zeros(4)}, 4, devices=n + 1)
