"""tmbx: Template Model Builder in JAX.

Write a negative log-likelihood over fixed parameters and latent effects in
JAX; tmbx integrates the latent effects out with a Laplace approximation
(exact gradients by implicit differentiation, sparse Hessians), fits, and
reports standard errors as TMB's ``sdreport`` does. On top of the engine,
``tmbx.glmm`` fits glmmTMB's formulas on pandas data frames.
"""

import os as _os

# Python started in a source checkout's root finds this folder as ``tmbx``
# before any installed copy, and ``families/``, ``covstructs/`` sit beside it
# rather than inside (setuptools' package-dir mapping): look for them there too.
if not _os.path.isdir(_os.path.join(__path__[0], "families")) and _os.path.isfile(
        _os.path.join(__path__[0], _os.pardir, "families", "__init__.py")):
    __path__.append(_os.path.dirname(_os.path.abspath(__path__[0])))

from . import _config  # noqa: E402,F401  (float64 and the compilation cache, first)
from ._datasets import list_datasets, load_dataset
from ._iterative import IterativeOptions
from ._laplace import InnerOptions
from ._model import BatchFit, Fit, LatentGaussian, Model
from ._optim import BFGSOptions
from ._sdreport import SDReport
from ._shard import shard_rows, split_devices
from . import families, covstructs  # noqa: E402  (plug-in libraries)
from .formula import GlmmFit, anova, glmm
from .inference import kr_test, pb_test
from .batch import glmm_batch, power

__all__ = [
    "BFGSOptions", "BatchFit", "IterativeOptions", "GlmmFit", "anova", "covstructs", "families", "glmm", "Fit", "InnerOptions", "LatentGaussian", "Model", "SDReport",
    "list_datasets", "load_dataset", "glmm_batch", "kr_test", "pb_test", "power", "shard_rows", "split_devices",
]
__version__ = "0.1.0"
