"""Attention transfer between feature maps of different resolutions (pure torch)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from litcompress.distillation import attention_map, feature_loss


def test_attention_maps_of_different_sizes_are_compared_at_the_teachers_resolution():
    torch.manual_seed(0)
    student, teacher = torch.randn(4, 8, 12, 12), torch.randn(4, 32, 6, 6)
    energy = student.pow(2).mean(1)
    pooled = F.normalize(F.avg_pool2d(energy.unsqueeze(1), 2).squeeze(1).flatten(1), dim=1)  # 12x12 -> 6x6 by 2x2 means
    torch.testing.assert_close(attention_map(student, (6, 6)), pooled)
    expected = (pooled - attention_map(teacher)).pow(2).sum(1).mean()
    torch.testing.assert_close(feature_loss(student, teacher, "attention"), expected)
    same = torch.randn(4, 8, 6, 6)
    torch.testing.assert_close(attention_map(same, (6, 6)), attention_map(same))  # nothing resampled
    with pytest.raises(ValueError, match="feature maps with 2 spatial dimensions"):
        feature_loss(torch.randn(4, 8, 12), teacher, "attention")
