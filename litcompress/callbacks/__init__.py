"""Lightning callbacks: when compression happens during ``Trainer.fit``, and the report of what it bought."""

from litcompress.callbacks.channel_pruning import ChannelPruning
from litcompress.callbacks.lowrank import LowRankFactorization
from litcompress.callbacks.pruning import Pruning
from litcompress.callbacks.qat import QuantizationAwareTraining
from litcompress.callbacks.report import CompressionReport

__all__ = ["ChannelPruning", "CompressionReport", "LowRankFactorization", "Pruning", "QuantizationAwareTraining"]
