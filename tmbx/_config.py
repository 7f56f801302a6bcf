"""Process-wide JAX settings that tmbx needs.

Mixed-model parity with glmmTMB/TMB needs float64, so importing tmbx turns on
``jax_enable_x64`` (the user never has to remember it). JAX's persistent
compilation cache is enabled too, so a fresh process does not pay XLA's
compile time again for a model structure it has already seen.
"""

import os

import jax

jax.config.update("jax_enable_x64", True)


def _enable_persistent_cache() -> None:
    if os.environ.get("TMBX_NO_CACHE"):
        return
    if jax.config.jax_compilation_cache_dir:  # the user chose one already
        return
    path = os.environ.get(
        "TMBX_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cache", "tmbx", "jax")
    )
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:
        return
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


_enable_persistent_cache()
