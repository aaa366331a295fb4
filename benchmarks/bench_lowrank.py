"""Low-rank factorization of LeNet-300-100 on real digits: `LowRankFactorization` at several energies.

LeNet-300-100 (784-300-100-10, 266k weights) trained on MNIST-5k for ``--epochs`` epochs with Adam and a cosine
decay: once dense, and once per energy with `LowRankFactorization(energy=e, start=--at)`: dense for ``--at`` epochs,
then every layer whose truncated SVD keeping ``e`` of its squared singular values cuts its weights is factorized
in the same fit, and the remaining epochs fine-tune the factorized model (same seed, data and optimizer; the first
``--at`` epochs are identical to the dense run's). Rows: the ranks, parameters, test accuracy right after the
factorization and at the end of the fit, FLOPs, and fp32 latency in ONNX Runtime and eager PyTorch (medians,
all models timed in the same process, alternating), as ratios to the dense model.

    python benchmarks/bench_lowrank.py           # about 3 minutes on 2 CPU cores
    python benchmarks/bench_lowrank.py --quick   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_channels import flop_count, latencies
from mnist5k import Classifier, mnist_5k, quiet_lightning
from prune_mnist import LeNet300100

from litcompress import LowRankFactorization


def accuracy(model: torch.nn.Module, test) -> float:
    was = model.training
    model.eval()
    with torch.no_grad():
        acc = float((model(test.tensors[0]).argmax(1) == test.tensors[1]).float().mean())
    model.train(was)
    return acc


class AccuracyAtChange(pl.Callback):
    """Test accuracy at the first batch of epoch ``at``: after the factorization (this runs after it), before any
    fine-tuning step."""

    def __init__(self, at: int, test) -> None:
        self.at, self.test = at, test
        self.value: float | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.current_epoch == self.at and batch_idx == 0:
            self.value = accuracy(pl_module.model, self.test)


def train(data, test, epochs: int, seed: int, callbacks: list) -> tuple[torch.nn.Module, float]:
    pl.seed_everything(seed, verbose=False)
    module = Classifier(LeNet300100(), lr=1e-3, weight_decay=0.0)
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
                         num_sanity_val_steps=0)
    trainer.fit(module, DataLoader(data, batch_size=64, shuffle=True))
    return module.model.eval(), accuracy(module.model, test)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--at", type=int, default=6)
    parser.add_argument("--energy", type=float, nargs="+", default=[0.5, 0.7, 0.8, 0.9, 0.95])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/lowrank.json"))
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    quiet_lightning()
    torch.set_num_threads(2)
    data, test = mnist_5k(args.seed)
    repeats = 30
    if args.quick:
        data = torch.utils.data.TensorDataset(*(t[:512] for t in data.tensors))
        args.epochs, args.at, args.energy, repeats = 2, 1, args.energy[:2], 3
    models, acc, at_change, ranks = {}, {}, {}, {}
    models["dense"], acc["dense"] = train(data, test, args.epochs, args.seed, [])
    for energy in args.energy:
        name = f"energy {energy:g}"
        lowrank = LowRankFactorization(energy=energy, start=args.at, verbose=False)
        probe = AccuracyAtChange(args.at, test)
        models[name], acc[name] = train(data, test, args.epochs, args.seed, [lowrank, probe])
        at_change[name] = probe.value
        ranks[name] = {k: f"{r.rank}/{r.full_rank}" if r.factorized else "dense" for k, r in lowrank.results.items()}
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    flops = {name: flop_count(m) for name, m in models.items()}
    result: dict[str, Any] = {"accuracy": acc, "accuracy_at_change": at_change, "ranks": ranks, "parameters": params,
                              "flops": flops, "latency_ms": {}, "args": {k: str(v) for k, v in vars(args).items()}}
    for batch in (256, 1):
        result["latency_ms"][batch] = latencies(models, batch, repeats)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    for name in models:
        change = at_change.get(name)
        print(f"{name:12s} ranks {ranks.get(name, '-')}  params {params[name]:,} "
              f"({params['dense'] / params[name]:.2f}x fewer)  FLOPs {flops['dense'] / flops[name]:.2f}x fewer  "
              f"accuracy {'' if change is None else f'{change:.2%} at the change -> '}{acc[name]:.2%}")
        for batch, lat in result["latency_ms"].items():
            for kind in ("onnx", "eager"):
                d, p = lat["dense"][kind], lat[name][kind]
                print(f"    batch {batch:3d} {kind:5s}: {p:.3f} ms ({d / p:.2f}x faster than dense)")
    return result


if __name__ == "__main__":
    main()
