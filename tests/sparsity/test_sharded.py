"""Masks computed on FSDP2-style row shards (DTensor, Shard(0), 2 gloo processes) equal the masks computed on
whole tensors, row for row: global and per-layer thresholds, N:M, ties, uneven and empty shards."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from litcompress.selection import select_parameters
from litcompress.sparsity.pruner import Pruner
from tests.helpers import free_port


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 7), nn.ReLU(), nn.Linear(7, 1), nn.Linear(1, 8), nn.Linear(8, 12))
    with torch.no_grad():  # many exact ties: scores on a coarse grid
        model[4].weight.copy_(torch.randint(-3, 4, model[4].weight.shape).float())
    return model


CASES = [
    dict(sparsity=0.6, scope="global"),
    dict(sparsity=0.55, scope="layer"),
    dict(sparsity={r"^4": 0.7, r"^0": 0.3}),
    dict(pattern="2:4", sparsity=0.5, exclude=[r"^2", r"^3"]),
    dict(sparsity=0.5, importance="random", scope="global", seed=3),
]


def _masks(model: nn.Module, case: dict, fractions=(0.5, 1.0)) -> tuple[dict, list]:
    case = dict(case)
    exclude = case.pop("exclude", ())
    pruner = Pruner(select_parameters(model, exclude=exclude), **case)
    history = [pruner.update(f) for f in fractions]
    return pruner, history


def _worker(rank: int, port: int, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    mesh = init_device_mesh("cpu", (2,))
    results = {}
    for i, case in enumerate(CASES):
        model = _model()
        for module in model:
            for name, p in list(module.named_parameters(recurse=False)):
                setattr(module, name, nn.Parameter(distribute_tensor(p.detach(), mesh, [Shard(0)])))
        pruner, history = _masks(model, case)
        state = pruner.state_dict()
        results[i] = {
            "masks": {k: v.full_tensor() for k, v in state["masks"].items()},
            "weights": {k: v.full_tensor() for k, v in model.state_dict().items()},
            "history": history,
            "local_rows": {k: tuple(v.shape) for k, v in pruner.masks.items()},
        }
    torch.save(results, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    out = tmp_path_factory.mktemp("sharded")
    mp.spawn(_worker, args=(free_port(), str(out)), nprocs=2, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in (0, 1)]


@pytest.mark.parametrize("index", range(len(CASES)))
def test_sharded_masks_equal_whole_tensor_masks(sharded, index):
    model = _model()
    pruner, history = _masks(model, CASES[index])
    for rank in (0, 1):
        got = sharded[rank][index]
        assert got["history"] == history  # sparsities reduced over processes
        assert got["masks"].keys() == pruner.masks.keys()
        for name, mask in pruner.masks.items():
            assert torch.equal(got["masks"][name], mask), name
        for name, value in model.state_dict().items():
            assert torch.equal(got["weights"][name], value), name
    # each process held its rows only: 7 rows split 4 + 3, one row 1 + 0
    rows = {r: sharded[r][index]["local_rows"] for r in (0, 1)}
    if "0.weight" in rows[0]:
        assert rows[0]["0.weight"][0] + rows[1]["0.weight"][0] == 7 and rows[1]["0.weight"][0] == 3


def test_nm_split_group_is_an_error_on_dim0_sharding():
    """HF Conv1D-style weights group inputs along dim 0: a shard boundary inside a group is refused (checked without
    processes: the check reads the rows each process holds)."""
    from litcompress._shards import Shards

    model = nn.Linear(4, 6)
    refs = select_parameters(model)
    refs = [dataclasses.replace(refs[0], input_dim=0)]
    pruner = Pruner.__new__(Pruner)
    pruner.nm, pruner.refs = (2, 4), refs
    pruner.shards = Shards.__new__(Shards)
    pruner.shards.rows = [(3, 6)]
    with pytest.raises(ValueError, match="N:M groups that no shard boundary splits"):
        pruner._check_nm_shards()
