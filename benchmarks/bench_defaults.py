"""What `Pruning`'s defaults cost, against tuned settings, on real digits (MNIST-5k, LeNet-300-100).

The setting of issue 10: LeNet-300-100 trained dense, then fine-tuned for 8 epochs at a low learning rate with
`Pruning(sparsity=0.92)` (12.5x fewer weights) and every other argument at its default. Rows vary one choice at a
time (scope, where the final target is reached, whether the output layer is pruned), so the table shows which
default matters and by how much; the last row is Han et al.'s per-layer targets at a higher learning rate.

    python benchmarks/bench_defaults.py                  # 3 seeds, about 5 minutes on 2 CPU cores
    python benchmarks/bench_defaults.py --quick          # 1 seed, a few epochs (smoke run)
    python benchmarks/bench_defaults.py --rows defaults old_defaults
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from mnist5k import Classifier, mnist_5k, quiet_lightning
from prune_mnist import HAN_2015, LeNet300100

from litcompress import Pruning

SPARSITY = 0.92


def _rows(steps: int, epochs: int) -> dict[str, tuple[str, dict[str, Any], float]]:
    """name -> (description, Pruning arguments, learning rate); ``steps`` optimizer steps in the fine-tuning."""
    five_eighths = round(steps * 5 / 8)
    last = dict(interval="step", end=steps)  # the final target at the last optimizer step (the old default)
    return {
        "defaults": ("Pruning(0.92), today's defaults", {}, 1e-4),
        "old_defaults": ("scope='layer', target at the last step, head pruned (defaults before issue 10)",
                         dict(scope="layer", frequency=100, **last), 1e-4),
        "layer_end_5_8": ("scope='layer', target at 5/8 of the fit, head pruned",
                          dict(scope="layer", interval="step", end=five_eighths), 1e-4),
        "global_last": ("scope='global', target at the last step, head pruned", dict(scope="global", **last), 1e-4),
        "layer_last_keep_head": ("scope='layer', target at the last step, exclude=['<last>']",
                                 dict(scope="layer", exclude=["<last>"], **last), 1e-4),
        "global_end_5_8": ("scope='global', target at 5/8 of the fit, head pruned",
                           dict(scope="global", interval="step", end=five_eighths), 1e-4),
        "global_end_3_4": ("scope='global', target at 3/4 of the fit, head pruned",
                           dict(scope="global", interval="step", end=round(steps * 3 / 4)), 1e-4),
        "global_end_5_8_keep_head": ("scope='global', target at 5/8 of the fit, exclude=['<last>']",
                                     dict(scope="global", interval="step", end=five_eighths, exclude=["<last>"]),
                                     1e-4),
        "han_lr_1e-3": ("Han et al.'s per-layer targets (8%/9%/26% kept), target at 5/8, lr 1e-3",
                        dict(sparsity=HAN_2015, scope="layer", interval="step", end=five_eighths), 1e-3),
    }


def _fit(model: nn.Module, lr: float, epochs: int, seed: int, callbacks: list[pl.Callback]) -> float:
    pl.seed_everything(seed, verbose=False)
    train, test = mnist_5k(seed)
    module = Classifier(model, lr=lr, weight_decay=0.0)
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_model_summary=False, enable_progress_bar=False, callbacks=callbacks)
    trainer.fit(module, DataLoader(train, batch_size=64, shuffle=True), DataLoader(test, batch_size=500))
    return float(trainer.callback_metrics["val/acc"])


def _kept(model: nn.Module) -> float:
    weights = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    return sum(int((w != 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--dense-epochs", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=8, help="fine-tuning epochs with pruning")
    parser.add_argument("--rows", nargs="+", default=None, help="which rows (default: all)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="1 seed, 3 dense + 2 pruning epochs")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.dense_epochs, args.epochs = [0], 3, 2
    torch.set_num_threads(args.threads)
    quiet_lightning()
    t0 = time.perf_counter()
    steps = args.epochs * -(-4000 // 64)  # optimizer steps of the fine-tuning (4,000 digits, batch 64)
    rows = _rows(steps, args.epochs)
    names = args.rows or list(rows)
    acc: dict[str, list[float]] = {name: [] for name in ["dense", *names]}
    kept: dict[str, float] = {}
    for seed in args.seeds:
        dense = LeNet300100()
        acc["dense"].append(_fit(dense, 1e-3, args.dense_epochs, seed, []))
        for name in names:
            _, kwargs, lr = rows[name]
            model = copy.deepcopy(dense)
            acc[name].append(_fit(model, lr, args.epochs, seed,
                                  [Pruning(**{"sparsity": SPARSITY, **kwargs}, verbose=False)]))
            kept[name] = _kept(model)
            print(f"seed {seed} {name:28s} {acc[name][-1]:.2%}", flush=True)

    def mean(values: list[float]) -> str:
        return f"{100 * statistics.mean(values):.2f}" + (f" ± {100 * statistics.stdev(values):.2f}"
                                                         if len(values) > 1 else "")

    dense_mean = statistics.mean(acc["dense"])
    print(f"\nLeNet-300-100 on MNIST-5k: dense {args.dense_epochs} epochs, then {args.epochs} epochs with pruning "
          f"(seeds {args.seeds}; {time.perf_counter() - t0:.0f} s)\n")
    print("| setting | weights kept | test accuracy (%) | vs dense (pts) |")
    print("|---|---|---|---|")
    print(f"| dense (before pruning) | 100% | {mean(acc['dense'])} | |")
    for name in names:
        print(f"| {rows[name][0]} | {kept[name]:.1%} | {mean(acc[name])} | "
              f"{100 * (statistics.mean(acc[name]) - dense_mean):+.2f} |")
    return {"acc": acc, "kept": kept, "rows": {n: rows[n][0] for n in names}}


if __name__ == "__main__":
    main()
