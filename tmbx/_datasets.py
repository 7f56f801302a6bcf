"""Real data sets bundled with tmbx (from R's lme4, glmmTMB, nlme, MASS).

Each set is a CSV with its factor columns' levels, in R's order, beside it:
reading the factors with that order gives the same reference levels (and so
the same coefficients) as R.
"""

from __future__ import annotations

import json
from importlib import resources

import pandas as pd

_DESCRIPTIONS = {
    "sleepstudy": "Reaction times (ms) of 18 subjects over 10 days of sleep deprivation (lme4).",
    "cbpp": "Contagious bovine pleuropneumonia incidence in 15 herds over 4 periods (lme4).",
    "salamanders": "Salamander counts at 23 sites, 7 species/stages, mined or not (glmmTMB).",
    "owls": "Begging negotiations of barn owl nestlings in 27 nests (glmmTMB).",
    "cake": "Breakage angle of chocolate cakes: 3 recipes, 6 temperatures, 15 replicates (lme4).",
    "penicillin": "Penicillin potency: 24 plates x 6 samples, crossed (lme4).",
    "insteval": "Lecture evaluations at ETH Zurich: 73,421 ratings, students x lecturers (lme4).",
    "orthodont": "Pituitary-pterygomaxillary distance of 27 children at ages 8-14 (nlme).",
    "topo": "Topographic heights on a 310 ft square (MASS).",
    "dyestuff2": "Simulated yields of dyestuff in 6 batches, zero batch variance (lme4).",
    "agq_vector": "Simulated logistic data with random intercepts and slopes on clusters of 4.",
}


def list_datasets() -> dict[str, str]:
    """Names of the bundled data sets, with a line describing each."""
    return dict(_DESCRIPTIONS)


def load_dataset(name: str) -> pd.DataFrame:
    """Load a bundled data set as a DataFrame, factors as ordered-level categoricals.

    >>> df = tmbx.load_dataset("sleepstudy")
    """
    if name not in _DESCRIPTIONS:
        raise ValueError(
            f"No bundled data set {name!r}; available: {', '.join(sorted(_DESCRIPTIONS))}."
        )
    root = resources.files("tmbx.data")
    levels_file = root.joinpath(f"{name}.levels.json")
    levels = json.loads(levels_file.read_text()) if levels_file.is_file() else {}
    levels = levels or {}
    with root.joinpath(f"{name}.csv").open("r") as fh:
        df = pd.read_csv(fh, dtype={col: str for col in levels})
    for col, lv in levels.items():
        if col in df.columns:
            df[col] = pd.Categorical(df[col], categories=[str(x) for x in lv])
    return df
