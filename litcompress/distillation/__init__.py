"""Distillation in pure torch: losses (feature and label-free distillation come with issue 4)."""

from litcompress.distillation.losses import kd_loss, mse_distillation_loss

__all__ = ["kd_loss", "mse_distillation_loss"]
