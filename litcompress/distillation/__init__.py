"""Distillation in pure torch: soft-target and feature losses, feature capture and adapters, batches and model
outputs (Hugging Face dicts and ``ModelOutput``), and DistilBERT-style initialisation of a student."""

from litcompress.distillation.batches import output_logits, split_batch
from litcompress.distillation.cache import TeacherCache, topk_compress, topk_expand
from litcompress.distillation.config import FeatureDistillation, MixupTransfer
from litcompress.distillation.ensemble import TeacherEnsemble
from litcompress.distillation.features import attention_map, capture, feature_loss, make_adapter, output_width
from litcompress.distillation.from_teacher import init_from_teacher
from litcompress.distillation.losses import kd_loss, mse_distillation_loss

__all__ = ["FeatureDistillation", "MixupTransfer", "TeacherCache", "TeacherEnsemble", "attention_map", "capture",
           "feature_loss", "init_from_teacher", "kd_loss", "make_adapter", "mse_distillation_loss", "output_logits",
           "output_width", "split_batch", "topk_compress", "topk_expand"]
