"""fedtune's own peft tuners: ``bitfit`` and ``bottleneck``, registered with peft as peft's own are.

Importing this package is light (no torch, no peft). Naming a tuner class from it
(``from fedtune.methods.tuners import BitFitConfig``) imports peft and registers the tuners, so
that ``get_peft_model`` and ``PeftModel.from_pretrained`` know them. A consumer that only loads
saved adapters calls :func:`install_import_hook` (``import fedtune`` does) or :func:`register`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from fedtune.methods.tuners.registration import PEFT_TYPE_NAMES, install_import_hook, register

if TYPE_CHECKING:
    from fedtune.methods.tuners.bitfit import BitFitConfig, BitFitLayer, BitFitModel
    from fedtune.methods.tuners.bottleneck import BottleneckConfig, BottleneckLayer, BottleneckModel

# Public name -> defining module; resolved on first access, since the modules import torch and peft.
_LAZY = {
    "BitFitConfig": "fedtune.methods.tuners.bitfit",
    "BitFitLayer": "fedtune.methods.tuners.bitfit",
    "BitFitModel": "fedtune.methods.tuners.bitfit",
    "BottleneckConfig": "fedtune.methods.tuners.bottleneck",
    "BottleneckLayer": "fedtune.methods.tuners.bottleneck",
    "BottleneckModel": "fedtune.methods.tuners.bottleneck",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    register()  # whoever uses a tuner class needs peft to know it
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


__all__ = [
    "PEFT_TYPE_NAMES",
    "BitFitConfig",
    "BitFitLayer",
    "BitFitModel",
    "BottleneckConfig",
    "BottleneckLayer",
    "BottleneckModel",
    "install_import_hook",
    "register",
]
