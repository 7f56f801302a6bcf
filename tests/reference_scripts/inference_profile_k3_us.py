"""Data for tests/data/inference/k3_us.csv: a three-term random-slope LMM.

    python tests/reference_scripts/inference_profile_k3_us.py   # writes the CSV
    Rscript tests/reference_scripts/inference_profile_k3_us.R   # lme4's profile intervals

30 groups x 12 observations, y = 10 + x1 - 0.5 x2 + b0 + b1 x1 + b2 x2 + e with
(b0, b1, b2) normal, sds (2, 0.8, 0.6), correlations (0.5, -0.3, 0.4), e ~ N(0, 1).
"""

from pathlib import Path

import numpy as np
import pandas as pd

OUT = Path(__file__).resolve().parents[1] / "data" / "inference" / "k3_us.csv"

rng = np.random.default_rng(20261126)
G, n = 30, 12
C = np.array([[1.0, 0.5, -0.3], [0.5, 1.0, 0.4], [-0.3, 0.4, 1.0]])
sd = np.array([2.0, 0.8, 0.6])
b = rng.multivariate_normal(np.zeros(3), np.diag(sd) @ C @ np.diag(sd), size=G)
g = np.repeat(np.arange(G), n)
x1 = rng.normal(size=G * n)
x2 = rng.normal(size=G * n)
y = 10 + 1.0 * x1 - 0.5 * x2 + b[g, 0] + b[g, 1] * x1 + b[g, 2] * x2 + rng.normal(scale=1.0, size=G * n)
pd.DataFrame(dict(y=np.round(y, 6), x1=np.round(x1, 6), x2=np.round(x2, 6),
                  g=[f"g{i:02d}" for i in g])).to_csv(OUT, index=False)
