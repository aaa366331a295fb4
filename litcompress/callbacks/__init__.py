"""Lightning callbacks: when compression happens during ``Trainer.fit``."""

from litcompress.callbacks.pruning import Pruning

__all__ = ["Pruning"]
