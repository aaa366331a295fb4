"""Train-step time and peak memory: plain training vs litcompress `Pruning` vs Lightning's `ModelPruning`.

Every pruning configuration prunes the same tensors (all Linear weights) to the same final sparsity (90%, layer-wise,
L1 magnitude) at the end of epoch 0, then trains on with the masks enforced. A step is timed from the first
callback's `on_train_batch_start` to the last callback's `on_train_batch_end`, so work done in hooks counts.
Each configuration runs in its own process (clean peak RSS) and the rounds interleave the configurations, so
drift on the machine hits all of them alike.

    python benchmarks/bench_pruning.py              # full run, writes benchmarks/out/pruning.json
    python benchmarks/bench_pruning.py --quick      # a smoke run (used by the tests)
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = ("plain", "empty-callback", "litcompress", "litcompress-gradual", "lightning")
MODELS = {"mlp-784-512-256-10": (784, 512, 256, 10), "lenet-300-100": (784, 300, 100, 10)}


def _one(model_name: str, config: str, epochs: int, steps_per_epoch: int, batch: int, threads: int) -> dict:
    import lightning.pytorch as pl
    import torch
    import torch.nn.functional as F
    from lightning.pytorch.callbacks import ModelPruning
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from litcompress import Pruning

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    sizes = MODELS[model_name]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(sizes) - 2 else [])
    net = nn.Sequential(*layers)

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = net

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.net(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)

    class Clock(pl.Callback):  # placed first and last: times everything in between
        def __init__(self, starts: bool, times: list):
            self.starts, self.times = starts, times

        def on_train_batch_start(self, trainer, *args):
            if self.starts:
                self.times.append([trainer.current_epoch, trainer.global_step, time.perf_counter(), hook_time[0]])

        def on_train_batch_end(self, trainer, *args):
            if not self.starts:
                self.times[-1][2] = time.perf_counter() - self.times[-1][2]
                self.times[-1][3] = hook_time[0] - self.times[-1][3]

        def on_train_epoch_end(self, trainer, pl_module):
            # extra tensors the pruning keeps while training (before ModelPruning makes pruning permanent)
            if self.starts and trainer.current_epoch == trainer.max_epochs - 1:
                ours = [m for cb in trainer.callbacks if isinstance(cb, Pruning) for m in cb.pruner.masks.values()]
                theirs = [b for n, b in net.named_buffers() if n.endswith("_mask")]
                # torch.nn.utils.prune also recomputes `weight` from `weight_orig * weight_mask`: one more copy
                theirs += [m.weight for m in net if hasattr(m, "weight_orig")]
                state.append(sum(t.numel() * t.element_size() for t in ours + theirs))

    times: list = []
    state: list = []
    callbacks: list = []
    hook_time = [0.0]  # seconds spent inside the pruning machinery (in-process, low noise)

    def timed(owner, attr):
        original = getattr(owner, attr)

        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return original(*a, **k)
            finally:
                hook_time[0] += time.perf_counter() - t0

        setattr(owner, attr, wrapper)

    from litcompress.callbacks.pruning import Pruning as _P
    from litcompress.sparsity.pruner import Pruner as _Pr
    timed(_Pr, "apply")
    timed(_P, "_maybe_update")
    timed(_P, "on_before_optimizer_step")
    # timed per step, between mask updates. Lightning's share is its forward pre-hook recomputing
    # weight = weight_orig * weight_mask; its backward through that product is NOT counted (an undercount)
    timed(torch.nn.utils.prune.BasePruningMethod, "__call__")
    if config == "empty-callback":  # control: what Lightning charges for any one extra callback
        callbacks.append(pl.Callback())
    elif config == "litcompress":
        # per layer, like ModelPruning(use_global_unstructured=False) below
        callbacks.append(Pruning(0.9, scope="layer", schedule="one_shot", start=1, interval="epoch", verbose=False))
    elif config == "litcompress-gradual":  # cubic schedule, masks recomputed every 25 steps: update cost included
        callbacks.append(Pruning(0.9, scope="layer", schedule="cubic", start=steps_per_epoch,
                                 end=epochs * steps_per_epoch, frequency=25, interval="step", verbose=False))
    elif config == "lightning":
        callbacks.append(ModelPruning("l1_unstructured", amount=lambda epoch: 0.9 if epoch == 0 else 0.0,
                                      use_global_unstructured=False, use_lottery_ticket_hypothesis=False,
                                      make_pruning_permanent=True))
    x = torch.randn(steps_per_epoch * batch, sizes[0])
    y = torch.randint(0, sizes[-1], (steps_per_epoch * batch,))
    loader = DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=True)
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[Clock(True, times), *callbacks, Clock(False, times)])
    trainer.fit(Module(), loader)
    linear = [m.weight for m in net if isinstance(m, nn.Linear)]
    sparsity = sum(int((w == 0).sum()) for w in linear) / sum(w.numel() for w in linear)
    after = [t for epoch, _, t, _ in times if epoch >= 1]  # masks in force (epoch 0 is the dense phase for all)
    gradual = config == "litcompress-gradual"
    updates = set(range(steps_per_epoch, epochs * steps_per_epoch + 1, 25)) if gradual else set()
    between = [t for epoch, step, t, _ in times if epoch >= 1 and step + 1 not in updates]
    hooks_between = [h for epoch, step, _, h in times if epoch >= 1 and step + 1 not in updates]
    return {
        "model": model_name, "config": config, "sparsity": sparsity,
        "median_ms": 1e3 * statistics.median(after), "median_between_updates_ms": 1e3 * statistics.median(between),
        "mean_ms": 1e3 * statistics.fmean(after), "max_ms": 1e3 * max(after),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "state_bytes_per_weight": state[0] / sum(w.numel() for w in linear) if state else 0.0,
        "hook_us_per_step": 1e6 * statistics.median(hooks_between),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny run for smoke tests")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "pruning.json")
    parser.add_argument("--child", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        model, config, epochs, spe, batch, threads = args.child
        print(json.dumps(_one(model, config, int(epochs), int(spe), int(batch), int(threads))))
        return

    epochs, spe, batch, rounds = (2, 4, 32, 1) if args.quick else (5, 100, 256, args.rounds)
    models = list(MODELS)[:1] if args.quick else list(MODELS)
    runs: list[dict] = []
    for r in range(rounds):
        for model in models:
            for config in CONFIGS:
                cmd = [sys.executable, __file__, "--child", model, config, str(epochs), str(spe), str(batch),
                       str(args.threads)]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True,
                                     env={**os.environ, "PYTHONWARNINGS": "ignore"})
                runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(f"round {r}: {model:20s} {config:20s} {runs[-1]['median_ms']:.3f} ms", file=sys.stderr)

    rows = []
    for model in models:
        def sel(config, model=model):
            return [x for x in runs if x["model"] == model and x["config"] == config]

        plain = sel("plain")
        for config in CONFIGS:
            mine = sel(config)
            # ratios against the plain run of the same round: slow drift of the machine cancels out
            ratio = [m["median_ms"] / p["median_ms"] for m, p in zip(mine, plain)]
            between = [m["median_between_updates_ms"] / p["median_ms"] for m, p in zip(mine, plain)]
            rss = statistics.median(x["peak_rss_mb"] for x in mine)
            rows.append({
                "model": model, "config": config, "sparsity": mine[0]["sparsity"],
                "median_step_ms": statistics.median(x["median_ms"] for x in mine),
                "vs_plain": statistics.median(ratio), "vs_plain_min": min(ratio), "vs_plain_max": max(ratio),
                "between_updates_vs_plain": statistics.median(between),
                "mean_step_ms": statistics.median(x["mean_ms"] for x in mine),
                "peak_rss_mb": rss, "extra_rss_mb": rss - statistics.median(x["peak_rss_mb"] for x in plain),
                "state_bytes_per_weight": mine[0]["state_bytes_per_weight"],
                "hook_us_per_step": statistics.median(x["hook_us_per_step"] for x in mine),
                "hook_share_of_plain_step": statistics.median(
                    x["hook_us_per_step"] / 1e3 / p["median_ms"] for x, p in zip(mine, plain)),
            })
    import torch
    meta = {"machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, {platform.python_version()}",
            "torch": torch.__version__, "threads": args.threads, "epochs": epochs, "steps_per_epoch": spe,
            "batch": batch, "rounds": rounds}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows, "runs": runs}, indent=1))
    print("| model | config | final sparsity | median step (ms) | step vs plain (median, [min, max] over rounds) "
          "| between updates vs plain | mean step (ms) | peak RSS (MB) | extra RSS (MB) "
          "| pruning state (bytes/weight) | in pruning code (us/step) | in pruning code / plain step |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|")
    for x in rows:
        print(f"| {x['model']} | {x['config']} | {x['sparsity']:.3f} | {x['median_step_ms']:.2f} | "
              f"{x['vs_plain']:.3f}x [{x['vs_plain_min']:.3f}, {x['vs_plain_max']:.3f}] | "
              f"{x['between_updates_vs_plain']:.3f}x | {x['mean_step_ms']:.2f} | "
              f"{x['peak_rss_mb']:.0f} | {x['extra_rss_mb']:+.0f} | {x['state_bytes_per_weight']:.2f} | "
              f"{x['hook_us_per_step']:.0f} | {100 * x['hook_share_of_plain_step']:.1f}% |")
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
