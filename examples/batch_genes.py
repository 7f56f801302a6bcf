"""One negative binomial GLMM per gene, all genes in one batch (tmbx.glmm_batch).

    python examples/batch_genes.py

The R loop this replaces::

    for (g in genes) glmmTMB(y ~ group + (1|donor), data = subset(d, gene == g), family = nbinom2)

Counts are simulated as in /work/shared/reference/genes/make_genes_data.py:
cells from 10 donors in two groups, a random donor intercept per gene, and a
group effect in about one gene in ten.
"""

import numpy as np
import pandas as pd

import tmbx


def simulate_genes(n_genes=300, n_cells=1000, seed=1):
    rng = np.random.default_rng(seed)
    donor = rng.integers(0, 10, n_cells)
    group = np.where(donor < 5, "A", "B")
    frames = []
    for g in range(n_genes):
        effect = rng.normal(0.0, 0.7) if rng.random() < 0.1 else 0.0
        u = rng.normal(0.0, rng.uniform(0.1, 0.5), 10)
        mu = np.exp(rng.normal(0.0, 1.0) + effect * (group == "B") + u[donor])
        theta = rng.uniform(0.5, 5.0)
        frames.append(pd.DataFrame({"gene": f"g{g:05d}", "donor": [f"d{d}" for d in donor], "group": group,
                                    "y": rng.negative_binomial(theta, theta / (theta + mu))}))
    return pd.concat(frames, ignore_index=True)


if __name__ == "__main__":
    df = simulate_genes()
    fits = tmbx.glmm_batch("y ~ group + (1|donor)", data=df, by="gene", family="nbinom2")
    tab = fits.table()
    print(fits)
    print(tab[["converged", "loglik", "beta:group[T.B]", "se:group[T.B]", "padj:group[T.B]",
               "sd:Intercept|donor", "disp"]].sort_values("padj:group[T.B]").head(10))
    top = tab["padj:group[T.B]"].idxmin()
    print(fits[top].summary())  # that gene's full fit, as tmbx.glmm would return it

    # power of the donor-level design for a group effect of 0.5 (simr's powerSim)
    design = df[df.gene == "g00000"][["donor", "group"]]
    pw = tmbx.power("y ~ group + (1|donor)", design, "nbinom2",
                    fixef={"Intercept": 0.5, "group[T.B]": 0.5}, sd={"donor": 0.3}, disp=2.0,
                    test="group[T.B]", effect=[0.25, 0.5, 1.0], nsim=100)
    print(pw.table)
