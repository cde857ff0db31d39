"""Compatibility path: ``from catdpo_kernels.loss import loss, LossOutput, CatDPOLoss`` keeps working.

The implementation lives in ``catdpo_kernels.functional`` (``loss()``) and
``catdpo_kernels.modules`` (``CatDPOLoss``). Importing this module used to
replace the package attribute ``catdpo_kernels.loss`` (the function) with the
module; the module is therefore callable and forwards to ``loss()``, so that
``catdpo_kernels.loss(...)`` works whichever of the two it is.
"""

import sys
import types

from .functional import LossOutput, loss
from .modules import CatDPOLoss

__all__ = ["CatDPOLoss", "LossOutput", "loss"]


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return loss(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
# help() and inspect.signature() of the module then describe loss() itself.
__wrapped__ = loss
