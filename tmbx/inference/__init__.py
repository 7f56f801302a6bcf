"""Inference on fitted models: profiles, bootstrap, tests, df, marginal means.

The `GlmmFit` methods (``confint``, ``profile``, ``bootstrap``, ``anova``,
``drop1``, ``emmeans``, ...) call into this package; the model-comparison
functions are exported as ``tmbx.anova``, ``tmbx.pb_test`` and ``tmbx.kr_test``.
"""


def pb_test(fit0, fit1, nsim: int = 1000, seed: int = 0, **kwargs) -> dict:
    """Parametric-bootstrap likelihood-ratio test of nested fits (pbkrtest's PBmodcomp)."""
    from ._lrt import pb_test as _pb_test

    return _pb_test(fit0, fit1, nsim=nsim, seed=seed, **kwargs)


def kr_test(fit0, fit1, **kwargs) -> dict:
    """Kenward-Roger F test of nested LMMs (pbkrtest's KRmodcomp): F, ndf, ddf, p."""
    from ._ddf import kr_test as _kr_test

    return _kr_test(fit0, fit1, **kwargs)
