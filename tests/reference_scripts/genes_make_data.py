"""Writes tests/data/genes_ragged.csv: 16 simulated genes of different sizes.

The genes follow /work/shared/reference/genes/make_genes_data.py (NB2 counts,
random donor intercept, 10 donors in two groups), on 400 cells; then each gene
loses a random 0-40 % of its rows, and gene g00003 loses donor d3 entirely, so
that batch fitting has to pad rows and level slots.

usage: python tests/reference_scripts/genes_make_data.py
"""
import os

import numpy as np
import pandas as pd

HERE = os.path.dirname(os.path.abspath(__file__))
rng = np.random.default_rng(11)
n_genes, n_cells = 16, 400
donor = rng.integers(0, 10, n_cells)
group = np.where(donor < 5, "A", "B")
frames = []
for g in range(n_genes):
    b0 = rng.normal(0.5, 1.0)
    b1 = rng.normal(0.0, 0.5) if g % 3 == 0 else 0.0
    sd = rng.uniform(0.2, 0.6)
    theta = rng.uniform(0.5, 5.0)
    u = rng.normal(0.0, sd, 10)
    mu = np.exp(b0 + b1 * (group == "B") + u[donor])
    y = rng.negative_binomial(theta, theta / (theta + mu))
    keep = rng.random(n_cells) >= rng.uniform(0.0, 0.4)
    if g == 3:
        keep &= donor != 3
    frames.append(pd.DataFrame({"gene": f"g{g:05d}", "donor": [f"d{d}" for d in donor[keep]],
                                "group": group[keep], "y": y[keep]}))
pd.concat(frames).to_csv(os.path.join(HERE, "..", "data", "genes_ragged.csv"), index=False)
