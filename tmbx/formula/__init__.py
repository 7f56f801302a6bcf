"""glmmTMB's formula interface: design matrices, templates and fit objects."""

from ._api import anova, glmm
from ._design import Design, build_design, new_design
from ._fit import GlmmFit, VarCorrTerm

__all__ = ["Design", "GlmmFit", "VarCorrTerm", "anova", "build_design", "glmm", "new_design"]
