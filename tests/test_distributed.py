"""litcompress.distributed's public helpers on bad input (their sharded behaviour: tests/fsdp)."""

from __future__ import annotations

import pytest
import torch


@pytest.mark.parametrize("fn", ["gather_model", "is_sharded_model", "check_synced"])
def test_distributed_helpers_name_a_non_module(fn):
    from litcompress import distributed

    with pytest.raises(TypeError, match=r"Expected argument `model` to be a torch.nn.Module, but got 'dict'"):
        getattr(distributed, fn)({"weight": torch.ones(2)})
