"""Distillation in pure torch: soft-target and feature losses, feature capture and adapters."""

from litcompress.distillation.cache import TeacherCache, topk_compress, topk_expand
from litcompress.distillation.ensemble import TeacherEnsemble
from litcompress.distillation.features import attention_map, capture, feature_loss, make_adapter, output_width
from litcompress.distillation.losses import kd_loss, mse_distillation_loss

__all__ = ["TeacherCache", "TeacherEnsemble", "attention_map", "capture", "feature_loss", "kd_loss", "make_adapter",
           "mse_distillation_loss", "output_width", "topk_compress", "topk_expand"]
