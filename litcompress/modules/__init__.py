"""LightningModules: `DistillationModule`."""

from litcompress.modules.distillation import DistillationModule

__all__ = ["DistillationModule"]
