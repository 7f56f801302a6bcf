"""Troubleshooting and model checking: singular fits, convergence, R2, residuals, plots.

Reached through `GlmmFit` methods (``is_singular``, ``rePCA``, ``diagnose``,
``allfit``, ``r2``, ``check_overdispersion``, ``check_zeroinflation``,
``simulate_residuals``, ``plot``, ``plot_ranef``).
"""
