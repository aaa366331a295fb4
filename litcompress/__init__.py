"""litcompress: pruning, quantization-aware training and distillation inside an ordinary ``Trainer.fit``.

The Lightning parts (:class:`Pruning`, :class:`ChannelPruning`, :class:`QuantizationAwareTraining`,
:class:`LowRankFactorization`, :class:`CompressionReport`, :class:`DistillationModule`) load on first use, so
``import litcompress.sparsity`` (or any other pure-torch package: ``.quantization``, ``.distillation``,
``.factorization``, ``.structure``, ``.export``, ``.report``, ``.schedules``) never imports Lightning or
torchmetrics.

>>> import litcompress
>>> litcompress.Pruning.__name__
'Pruning'
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from litcompress import schedules
from litcompress.selection import select_parameters
from litcompress.sparsity import Pruner

if TYPE_CHECKING:  # pragma: no cover
    from litcompress.callbacks import (
        ChannelPruning,
        CompressionReport,
        LowRankFactorization,
        Pruning,
        QuantizationAwareTraining,
    )
    from litcompress.modules import DistillationModule

__version__ = "0.1.0"

__all__ = [
    "ChannelPruning",
    "CompressionReport",
    "DistillationModule",
    "LowRankFactorization",
    "Pruner",
    "Pruning",
    "QuantizationAwareTraining",
    "__version__",
    "schedules",
    "select_parameters",
]

_LAZY = {
    "ChannelPruning": "litcompress.callbacks",
    "CompressionReport": "litcompress.callbacks",
    "LowRankFactorization": "litcompress.callbacks",
    "Pruning": "litcompress.callbacks",
    "QuantizationAwareTraining": "litcompress.callbacks",
    "DistillationModule": "litcompress.modules",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # once loaded, a plain attribute
        return value
    raise AttributeError(f"module 'litcompress' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
