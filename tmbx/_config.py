"""Process-wide JAX settings that tmbx needs.

Mixed-model parity with glmmTMB/TMB needs float64, so importing tmbx turns on
``jax_enable_x64`` (the user never has to remember it). JAX's persistent
compilation cache is enabled too, so a fresh process does not pay XLA's
compile time again for a model structure it has already seen.
"""

import functools
import os


def _xla_flags() -> None:
    """XLA:CPU's concurrency-optimized scheduler can run several batched LAPACK
    calls (the arrow layout's head-block solves) at once; each splits its batch
    onto the same intra-op thread pool and waits, and once every pool thread
    waits the process deadlocks (jaxlib 0.10; benchmarks/repro_lapack_deadlock.py).
    Turning that scheduler off avoids it. Must run before JAX creates its backend."""
    flag = "--xla_cpu_enable_concurrency_optimized_scheduler=false"
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_enable_concurrency_optimized_scheduler" not in flags:
        os.environ["XLA_FLAGS"] = (flags + " " + flag).strip()


_xla_flags()

import jax  # noqa: E402

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
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


_enable_persistent_cache()


def _single_threaded_lapack() -> None:
    """Run jaxlib's LAPACK kernels (scipy's OpenBLAS) on one thread.

    jaxlib calls LAPACK through scipy's OpenBLAS. With OpenBLAS's default
    threading, a 50 x 50 triangular solve takes milliseconds instead of
    tens of microseconds (thread start-up dominates the small, many
    factorizations a Laplace fit makes). Only scipy's copy is limited;
    numpy's BLAS is left alone. ``TMBX_LAPACK_THREADS`` overrides.
    """
    n = int(os.environ.get("TMBX_LAPACK_THREADS", "1"))
    try:
        import scipy.linalg  # noqa: F401  (load scipy's OpenBLAS)
        from threadpoolctl import ThreadpoolController
    except ImportError:  # pragma: no cover
        return
    for lib in ThreadpoolController().lib_controllers:
        path = lib.filepath.replace("\\", "/")
        if "scipy.libs" in path or "/scipy/" in path:
            lib.set_num_threads(n)


_single_threaded_lapack()


# A model whose data hold at most this many numbers (and with at most _SMALL_U
# latent effects) is "small": its programs are compiled at XLA's backend
# optimization level 0. Measured on 2 cores: a cold first fit of sleepstudy,
# cbpp or Salamanders' ZIP model takes 1.1-1.4 s less (LLVM's optimization of the
# large fit program is most of its compile time), and those fits run in
# milliseconds either way; on InstEval or a 1e5-row ladder the same setting
# doubles the run time, so larger models keep the default. XLA:CPU's fusion
# emitters are off at that level too: the fit programs of topo_exp and of the
# Owls zinb1 model compile in 0.4 s and 2.0 s instead of 1.1 s and 2.7 s, and
# run as fast or up to 1.5 times slower (the optimized tier keeps them on).
# XLA's loop-invariant code motion is off at that level too: it hoists the
# data-only parts of the objective out of the optimizer's loop, which at level 0
# costs more compile time than it saves in runs. Fit programs, compiled and
# run (3 runs, best): owls_zinb1 2.8 s / 0.14 s with it, 1.9 s / 0.07 s
# without; salamanders_zip 1.3 / 0.26 against 0.6 / 0.17; hurdle_nb2 3.0 / 0.13
# against 1.0 / 0.11; topo_exp 0.9 / 0.39 against 0.5 / 0.46. A cold first fit
# of owls_zinb1 went from 3.6 s to 2.8 s. (At -O2, for the optimized tier and
# large models, it stays on: without it their programs run up to 25% slower.)
_SMALL_DATA = 200_000
_SMALL_U = 5_000


def compile_options(data, n_u: int):
    """``compiler_options`` for `jax.jit` of a model's programs (None: XLA's
    defaults). ``TMBX_FAST_COMPILE=1`` / ``0`` forces the choice either way."""
    force = os.environ.get("TMBX_FAST_COMPILE")
    if force is not None and force != "":
        small = force not in ("0", "false", "False")
    elif jax.default_backend() != "cpu":  # measured on XLA:CPU only; GPU kernels keep -O2
        small = False
    else:
        small = _data_size(data) <= _SMALL_DATA and n_u <= _SMALL_U
    return _known(FAST_COMPILE) if small else None


def small_program_options():
    """``compiler_options`` of the small programs that run once on a few numbers
    (`tmbx._internal.eval_method`: a covariance structure's factor at the start
    values, a family's variance): `FAST_COMPILE` on XLA:CPU. A cold first fit of
    the crossed Gaussian ladder compiles five of them, in 0.06 s so against
    0.09 s at XLA's defaults."""
    if jax.default_backend() != "cpu":
        return None
    return _known(FAST_COMPILE) or None


def _data_size(data) -> int:
    """How many numbers ``data`` holds."""
    return sum(int(getattr(leaf, "size", 1)) for leaf in jax.tree_util.tree_leaves(data))


#: the compiler options of a small model's programs (`compile_options`)
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_cpu_use_fusion_emitters": False,
                "xla_disable_hlo_passes": "while-loop-invariant-code-motion"}
#: XLA:CPU's fusion emitters off (`lmm_compile_options`)
NO_FUSION_EMITTERS = {"xla_cpu_use_fusion_emitters": False}
#: XLA:CPU's YNNPACK fusions off (`fit_compile_options`); the option's empty list
#: enables none of its fusion types
NO_YNN_FUSIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


#: dense blocks of at least this order keep XLA:CPU's YNNPACK fusions
#: (`fit_compile_options`)
YNN_DENSE_ORDER = 512


def fit_compile_options(dense_order: int):
    """Extra ``compiler_options`` for the programs that run a Laplace fit (None:
    none), for a latent Hessian whose largest dense block has order
    ``dense_order`` (`tmbx._sparse` layouts' ``dense_order``).

    XLA:CPU hands some fused element-wise loops and reductions to YNNPACK. In a
    fit they are mostly reductions over each row's few random effects (arrays
    of 100,000 x 1 x 2), which YNNPACK runs slower than XLA's own loops, unless
    the model factors a large dense block, whose products they speed up.
    Measured on 2 cores, jaxlib 0.10.2, repeated fits with / without them:
    one grouping factor (block-diagonal), 1e5 rows, 1,000 groups: Poisson
    random slopes 0.305 / 0.204 s, nbinom2 0.340 / 0.267 s, Gamma 0.185 /
    0.095 s, zero-inflated nbinom2 0.628 / 0.584 s; `glmm_batch` over 2,000
    genes (dense blocks of 10) 4.3 / 4.0 s; TMB's ar1xar1 at 100 x 100
    (banded, blocks of 101) 0.533 / 0.536 s and the small reference cases, the
    same either way. With a dense tail of 948 levels (the crossed Bernoulli
    ladder) 0.77 / 0.89 s: from `YNN_DENSE_ORDER` (`tmbx._dense`'s block
    size, above which dense work is matrix products) they stay. (The
    profiled least squares of crossed Gaussian models keeps them too: 0.21 /
    0.26 s on that ladder, 0.47 / 0.54 s on InstEval.)"""
    if dense_order >= YNN_DENSE_ORDER or jax.default_backend() != "cpu":
        return None
    return _known(NO_YNN_FUSIONS) or None


def merged(*options):
    """The union of several ``compiler_options`` dicts (None where all are empty)."""
    out = {}
    for o in options:
        out.update(o or {})
    return out or None


def _known(options: dict) -> dict:
    """``options`` without those this jaxlib's XLA does not know (the debug
    options change between versions; an unknown one fails every compile).
    Each probe is a compile (10-20 ms), so every option tmbx uses is probed at
    once first (`_all_known`), one by one only where that fails."""
    if options.items() <= _every_option().items() and _all_known():
        return dict(options)
    return {k: v for k, v in options.items() if _option_known(k, v)}


def _every_option() -> dict:
    return {**FAST_COMPILE, **NO_FUSION_EMITTERS, **NO_YNN_FUSIONS}


@functools.cache
def _all_known() -> bool:
    return _compiles_with(_every_option())


@functools.cache
def _option_known(name: str, value) -> bool:
    return _compiles_with({name: value})


def _compiles_with(options: dict) -> bool:
    try:
        jax.jit(lambda x: x + 1).lower(1.0).compile(compiler_options=options)
    except Exception:  # noqa: BLE001 - XLA's error for an unknown option
        return False
    return True


#: profiled least squares (`tmbx.formula._lmm`) on data of at most this many
#: numbers compiles without XLA:CPU's fusion emitters (`lmm_compile_options`)
_MID_DATA = 3_000_000


def lmm_compile_options(data, n_u: int):
    """`compile_options` for the profiled least-squares fit of a linear mixed
    model. Its program is mostly sparse and dense linear algebra that XLA hands
    to library kernels, so XLA:CPU's fusion emitters buy it little: without them
    InstEval's fit compiles in 1.9 s instead of 3.4 s and runs in 0.54 s instead
    of 0.53 s, the 1e5-row crossed ladder's in 1.1 s instead of 2.0 s (0.20 s
    against 0.18 s). On the 1e6-row ladder a fit runs 10% longer (3.0 s against
    2.7 s) for 1.3 s less compilation, so data above `_MID_DATA` numbers keep
    them."""
    opts = compile_options(data, n_u)
    if opts is not None or os.environ.get("TMBX_FAST_COMPILE") or jax.default_backend() != "cpu":
        return opts
    return (_known(NO_FUSION_EMITTERS) or None) if _data_size(data) <= _MID_DATA else None
