"""tmbx: Template Model Builder in JAX.

Write a negative log-likelihood over fixed parameters and latent effects in
JAX; tmbx integrates the latent effects out with a Laplace approximation
(exact gradients by implicit differentiation, sparse Hessians), fits, and
reports standard errors as TMB's ``sdreport`` does. On top of the engine,
``tmbx.glmm`` fits glmmTMB's formulas on pandas data frames.
"""

from . import _config  # noqa: F401  (float64 and the compilation cache, first)
from ._datasets import list_datasets, load_dataset
from ._laplace import InnerOptions
from ._model import BatchFit, Fit, LatentGaussian, Model
from ._optim import BFGSOptions
from ._sdreport import SDReport
from . import families, covstructs  # noqa: E402  (plug-in libraries)
from .formula import GlmmFit, anova, glmm
from .inference import kr_test, pb_test
from .batch import glmm_batch, power

__all__ = [
    "BFGSOptions", "BatchFit", "GlmmFit", "anova", "covstructs", "families", "glmm", "Fit", "InnerOptions", "LatentGaussian", "Model", "SDReport",
    "list_datasets", "load_dataset", "glmm_batch", "kr_test", "pb_test", "power",
]
__version__ = "0.1.0"
