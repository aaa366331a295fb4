"""Lightning callbacks: when compression happens during ``Trainer.fit``."""

from litcompress.callbacks.pruning import Pruning
from litcompress.callbacks.qat import QuantizationAwareTraining

__all__ = ["Pruning", "QuantizationAwareTraining"]
