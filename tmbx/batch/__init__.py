"""Batch fitting: many models of one shape in one compiled, vectorized fit."""


def glmm_batch(formula, data, by, family="gaussian", batch_size=None, device=None, **kwargs):
    """Fit one GLMM per value of ``by`` (one compiled program, vmapped over members)."""
    from ._glmm_batch import glmm_batch as _glmm_batch

    return _glmm_batch(formula, data, by, family=family, batch_size=batch_size, device=device, **kwargs)


def power(*args, **kwargs):
    """Simulation-based power analysis (simr's powerSim), refits in batch."""
    from ._power import power as _power

    return _power(*args, **kwargs)
