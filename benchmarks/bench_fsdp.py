"""Peak memory per process of a sharded fit (FSDP2) with ``Pruning`` + ``QuantizationAwareTraining`` vs without.

Under FSDP2 every process holds only its rows of each weight, so the state litcompress keeps must be sharded too:
pruning masks of this process's rows only (``torch.bool``, 1 byte per local weight element), quantizer ranges and
scales that are small per layer. If some part of a callback gathered whole weights (a full mask, a full
fake-quantized copy), the peak memory of each process would grow towards the unsharded model's. This measures it.

The fit: an MLP of ~50M parameters (``Linear`` layers 2048 -> 4096 -> 4096 -> 4096 -> 2048 -> 8 classes, ReLU
between), random synthetic inputs, AdamW, a handful of optimizer steps, inside a real ``lightning`` ``Trainer.fit``
with ``ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)``, ``accelerator="cpu"``, ``devices=2``
(gloo). ``configure_model`` applies ``fully_shard`` to every layer holding parameters, then to the whole model (as in
``tests/fsdp/common.py``). Each process reads every other sample (its own ``DataLoader``).

Configurations, each in a fresh subprocess (Lightning relaunches that script as rank 1):

- ``without``: no callback.
- ``with``: ``Pruning(0.5, interval="step", start=1, frequency=2)`` and
  ``QuantizationAwareTraining(interval="step", start=0)`` (W8A8 defaults).

Every rank reports: peak RSS (``ru_maxrss`` of the process), RSS right before ``trainer.fit`` (imports, model and
data built, not yet sharded), hence the increment of the fit (peak minus that), the parameter count and the local
parameter elements (``to_local()`` of each DTensor), the bytes of the pruning masks it holds (and of all pruner
state: masks, scores, snapshots) and the bytes of the QAT state (ranges, scales). The project target for the ratio
of peak memory with/without is <= 1.3x.

    python benchmarks/bench_fsdp.py            # ~50M parameters, 6 steps
    python benchmarks/bench_fsdp.py --quick    # ~0.5M parameters, 2 steps (smoke test)
"""

from __future__ import annotations

import argparse
import importlib.metadata
import itertools
import json
import os
import platform
import resource
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

FULL = {"widths": (2048, 4096, 4096, 4096, 2048), "classes": 8, "batch": 16, "steps": 6}
QUICK = {"widths": (256, 512, 512, 256), "classes": 4, "batch": 8, "steps": 2}
CONFIGS = ("without", "with")
MIB = 2**20


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _tensor_bytes(value: Any) -> int:
    """Bytes of the tensors in a nested state (this process's part of a DTensor)."""
    import torch

    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, torch.Tensor):
        local = value.to_local() if hasattr(value, "to_local") else value
        return local.numel() * local.element_size()
    return 0


# ---------------------------------------------------------------------------------------------- the child process
def child(args: argparse.Namespace) -> None:
    import lightning.pytorch as pl
    import torch
    import torch.nn.functional as F
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from litcompress import Pruning, QuantizationAwareTraining

    torch.set_num_threads(args.threads)
    spec = QUICK if args.quick else FULL

    class Net(pl.LightningModule):
        def __init__(self, widths: tuple[int, ...], classes: int) -> None:
            super().__init__()
            layers: list[nn.Module] = []
            for a, b in itertools.pairwise(widths):
                layers += [nn.Linear(a, b), nn.ReLU()]
            self.model = nn.Sequential(*layers, nn.Linear(widths[-1], classes))

        def configure_model(self) -> None:
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            for module in list(self.model.modules())[1:]:
                if next(module.parameters(recurse=False), None) is not None:
                    fully_shard(module, mesh=mesh)
            fully_shard(self.model, mesh=mesh)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return F.cross_entropy(self.model(x), y)

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=1e-4)

    torch.manual_seed(0)
    module = Net(spec["widths"], spec["classes"])
    n = spec["steps"] * spec["batch"] * 2
    data = TensorDataset(torch.randn(n, spec["widths"][0]), torch.randint(0, spec["classes"], (n,)))
    callbacks: list[pl.Callback] = []
    if args.run == "with":
        callbacks = [Pruning(0.5, interval="step", start=1, frequency=2, verbose=False),
                     QuantizationAwareTraining(interval="step", start=0, verbose=False)]
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        max_steps=spec["steps"], callbacks=callbacks, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, use_distributed_sampler=False,
        default_root_dir=args.out)
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    loader = DataLoader(data, batch_size=spec["batch"], sampler=range(rank, n, 2))
    before, peak_before = _rss(), _peak()
    began = time.perf_counter()
    trainer.fit(module, loader)
    fit_s = time.perf_counter() - began
    peak, after = _peak(), _rss()

    params = list(module.parameters())
    result: dict[str, Any] = {
        "rank": trainer.global_rank, "config": args.run, "steps": trainer.global_step, "fit_s": fit_s,
        "rss_before_fit": before, "peak_before_fit": peak_before, "peak": peak, "rss_after_fit": after,
        "params": sum(p.numel() for p in params),
        "local_params": sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in params),
        "dtensor_params": sum(hasattr(p, "to_local") for p in params),
        "mask_bytes": 0, "pruner_bytes": 0, "qat_bytes": 0, "sparsity": None}
    for cb in callbacks:
        if isinstance(cb, Pruning) and cb.pruner is not None:
            masks = cb.pruner.masks
            result["mask_bytes"] = sum(v.numel() * v.element_size() for v in masks.values())
            result["mask_dtypes"] = sorted({str(v.dtype) for v in masks.values()})
            result["pruner_bytes"] = sum(_tensor_bytes(s) for s in (masks, cb.pruner.scores, cb.pruner.snapshot))
            result["sparsity"] = cb.pruner.sparsity()
        if isinstance(cb, QuantizationAwareTraining):
            result["qat_bytes"] = _tensor_bytes(cb.state_dict())
    Path(args.out, f"{args.run}-rank{result['rank']}.json").write_text(json.dumps(result))
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()  # rank 0 exits after rank 1 has written its numbers


# --------------------------------------------------------------------------------------------- the parent process
def launch(config: str, args: argparse.Namespace, out: Path) -> tuple[list[dict[str, Any]], float]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--run", config, "--out", str(out),
           "--threads", str(args.threads), *(["--quick"] if args.quick else [])]
    began = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # rank 0 and the rank 1 it launched (same session)
        log, _ = proc.communicate()
        sys.exit(f"{config}: timed out after {args.timeout} s\n{log[-4000:]}")
    wall = time.perf_counter() - began
    files = [out / f"{config}-rank{r}.json" for r in (0, 1)]
    if proc.returncode != 0 or not all(f.exists() for f in files):
        sys.exit(f"{config}: child failed (exit {proc.returncode})\n{log[-6000:]}")
    return [json.loads(f.read_text()) for f in files], wall


def table(results: dict[str, list[dict[str, Any]]], walls: dict[str, float]) -> str:
    rows = ["| config | params (M) | local param elems per rank (M) | RSS before fit r0 / r1 (MiB) | "
            "peak RSS r0 / r1 (MiB) | fit increment r0 / r1 (MiB) | pruning masks per rank (MiB) | "
            "pruner state per rank (MiB) | QAT state per rank (bytes) | steps | fit (s) | child wall (s) |",
            "|---" * 12 + "|"]
    for config, ranks in results.items():
        def both(f: Any, fmt: str = "{:.0f}", rs: list[dict[str, Any]] = ranks) -> str:
            return " / ".join(fmt.format(f(r)) for r in rs)

        rows.append(
            f"| {config} | {ranks[0]['params'] / 1e6:.2f} | {both(lambda r: r['local_params'] / 1e6, '{:.2f}')} | "
            f"{both(lambda r: r['rss_before_fit'] / MIB)} | {both(lambda r: r['peak'] / MIB)} | "
            f"{both(lambda r: (r['peak'] - r['rss_before_fit']) / MIB)} | "
            f"{both(lambda r: r['mask_bytes'] / MIB, '{:.2f}')} | {both(lambda r: r['pruner_bytes'] / MIB, '{:.2f}')} "
            f"| {both(lambda r: r['qat_bytes'])} | {ranks[0]['steps']} | "
            f"{max(r['fit_s'] for r in ranks):.1f} | {walls[config]:.0f} |")
    return "\n".join(rows)


def parent(args: argparse.Namespace) -> None:
    print("command:", shlex.join(["python", *sys.argv]))
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPU(s), {platform.platform()}, Python "
          f"{platform.python_version()}, torch {importlib.metadata.version('torch')}, lightning "
          f"{importlib.metadata.version('lightning')}; torch threads per rank: {args.threads}", flush=True)
    results, walls = {}, {}
    with tempfile.TemporaryDirectory(prefix="bench_fsdp_") as tmp:
        for config in CONFIGS:
            out = Path(tmp, config)
            out.mkdir()
            results[config], walls[config] = launch(config, args, out)
            print(f"{config}: done in {walls[config]:.0f} s", flush=True)
    print()
    print(table(results, walls))
    w, wo = results["with"], results["without"]
    peak = [a["peak"] / b["peak"] for a, b in zip(w, wo)]
    inc = [(a["peak"] - a["rss_before_fit"]) / max(1, b["peak"] - b["rss_before_fit"]) for a, b in zip(w, wo)]
    per_elem = [r["mask_bytes"] / r["local_params"] for r in w]
    sparsity = {k: round(v, 3) for k, v in (w[0]["sparsity"] or {}).items()}
    print()
    print(f"peak RSS with/without: rank 0 {peak[0]:.3f}x, rank 1 {peak[1]:.3f}x (target <= 1.3x: "
          f"{'met' if max(peak) <= 1.3 else 'NOT met'})")
    print(f"fit increment with/without: rank 0 {inc[0]:.3f}x, rank 1 {inc[1]:.3f}x")
    print(f"pruning masks: {', '.join(f'{b:.3f}' for b in per_elem)} bytes per local parameter element (rank 0, 1); "
          f"dtypes {w[0].get('mask_dtypes')}; final sparsity per layer {sparsity}; "
          f"DTensor parameters {w[0]['dtensor_params']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a ~0.5M-parameter model, 2 steps (smoke test)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per rank (2 ranks)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per configuration")
    parser.add_argument("--run", choices=CONFIGS, help=argparse.SUPPRESS)  # a child: one configuration
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    child(args) if args.run else parent(args)


if __name__ == "__main__":
    main()
