"""litcompress: pruning, quantization-aware training and distillation inside an ordinary ``Trainer.fit``."""

from litcompress import schedules
from litcompress.callbacks import CompressionReport, Pruning, QuantizationAwareTraining
from litcompress.modules import DistillationModule
from litcompress.selection import select_parameters
from litcompress.sparsity import Pruner

__version__ = "0.1.0"

__all__ = [
    "CompressionReport",
    "DistillationModule",
    "Pruner",
    "Pruning",
    "QuantizationAwareTraining",
    "__version__",
    "schedules",
    "select_parameters",
]
