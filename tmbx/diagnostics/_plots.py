"""Diagnostic plots of a `GlmmFit` (matplotlib, imported when a plot is drawn).

- `plot_fit`: residuals vs fitted, normal QQ of the residuals, scale-location, and a
  normal QQ of the conditional modes of the random effects (R's ``plot.lm`` panel plus
  lme4's ``qqmath(ranef)``);
- `plot_ranef`: caterpillar plot of the conditional modes with ``condVar`` intervals
  (lme4's ``dotplot(ranef(fit, condVar = TRUE))``).
"""

from __future__ import annotations

import numpy as np

from .._internal import LazyModule

sst = LazyModule("scipy.stats")


def _normal_qq(ax, values, label=None):
    v = np.sort(np.asarray(values, float))
    n = v.size
    q = sst.norm.ppf((np.arange(1, n + 1) - 0.5) / n)
    ax.plot(q, v, ".", ms=4, label=label)
    return q, v


def plot_fit(fit, type: str = "pearson", figsize=(10, 8)):
    """Four panels: residuals vs fitted, normal QQ of the residuals, scale-location
    (sqrt |residual| vs fitted) and normal QQ of the random effects' conditional modes.
    ``type``: "pearson" or "deviance" residuals. Returns the Figure."""
    import matplotlib.pyplot as plt

    if type not in ("pearson", "deviance"):
        raise ValueError(f"type must be 'pearson' or 'deviance', got {type!r}")
    res = np.asarray(fit.residuals(type=type), float)
    mu = np.asarray(fit.fitted(), float)
    fig, axes = plt.subplots(2, 2, figsize=figsize)
    ax = axes[0, 0]
    ax.plot(mu, res, ".", ms=4, alpha=0.7)
    ax.axhline(0, color="grey", ls="--", lw=0.8)
    ax.set(xlabel="Fitted values", ylabel=f"{type.capitalize()} residuals", title="Residuals vs fitted")

    ax = axes[0, 1]
    q, v = _normal_qq(ax, res)
    lo, hi = np.percentile(v, [25, 75]), sst.norm.ppf([0.25, 0.75])
    slope = (lo[1] - lo[0]) / (hi[1] - hi[0])
    ax.plot(q, lo[0] + slope * (q - hi[0]), "r-", lw=1)
    ax.set(xlabel="Theoretical quantiles", ylabel=f"{type.capitalize()} residuals", title="Normal Q-Q")

    ax = axes[1, 0]
    ax.plot(mu, np.sqrt(np.abs(res)), ".", ms=4, alpha=0.7)
    ax.set(xlabel="Fitted values", ylabel=r"$\sqrt{|residual|}$", title="Scale-location")

    ax = axes[1, 1]
    re = fit.ranef(condVar=False)
    for group, df in re.items():
        for col in df.columns:
            sd = df[col].std()
            if np.isfinite(sd) and sd > 0:
                _normal_qq(ax, df[col] / sd, label=f"{col} | {group}")
    ax.plot([-3, 3], [-3, 3], "r-", lw=1)
    ax.set(xlabel="Theoretical quantiles", ylabel="Standardized conditional modes", title="Random effects Q-Q")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_ranef(fit, level: float = 0.95, group: str | None = None, figsize=None):
    """Caterpillar plot: each random effect's conditional modes, sorted, with
    ``mode +/- z * sd`` intervals (conditional sds from ``fit.ranef(condVar=True)``).
    ``group``: one grouping factor (default all). One axes per (group, term). Returns the Figure."""
    import matplotlib.pyplot as plt

    if not 0 < level < 1:
        raise ValueError(f"level must be between 0 and 1, got {level}")
    re = fit.ranef(condVar=True)
    if not re:
        raise ValueError("This fit has no random effects to plot.")
    if group is not None:
        if group not in re:
            raise ValueError(f"group {group!r} is not a grouping factor of the fit; choose one of {list(re)}")
        re = {group: re[group]}
    panels = [(g, c) for g, df in re.items() for c in df.columns if not c.startswith("se:")]
    z = sst.norm.ppf(0.5 + level / 2)
    n_levels = max(len(re[g]) for g, _ in panels)
    fig, axes = plt.subplots(1, len(panels), squeeze=False,
                             figsize=figsize or (3.5 * len(panels), max(3.0, 0.18 * n_levels + 1)))
    for ax, (g, col) in zip(axes[0], panels):
        df = re[g].sort_values(col)
        pos = np.arange(len(df))
        ax.errorbar(df[col], pos, xerr=z * df[f"se:{col}"], fmt="o", ms=3, lw=1, capsize=0)
        ax.axvline(0, color="grey", ls="--", lw=0.8)
        ax.set_yticks(pos)
        ax.set_yticklabels([str(i) for i in df.index], fontsize=6)
        ax.set(title=f"{col} | {g}", xlabel=f"Conditional mode ({level:.0%} interval)")
    fig.tight_layout()
    return fig
