"""Channel pruning that makes a model faster: `ChannelPruning` on real digits, measured in ONNX Runtime.

The CNN of the MNIST examples (conv32-conv64-fc256-fc10, 317k parameters) trained on MNIST-5k with the same seed,
data and optimizer: dense, and with 50% and 75% of the channels of every conv and hidden layer pruned during the
same fit (default schedule: cubic, reaching the target at 3/4 of the fit) and removed at its end. Rows: test
accuracy, parameters, FLOPs (``torch.utils.flop_counter``, one digit), and fp32 latency in ONNX Runtime and in eager
PyTorch (median of repeated runs, all models timed in the same process, alternating), as ratios to the dense model.

    python benchmarks/bench_channels.py            # about 5 minutes on 2 CPU cores
    python benchmarks/bench_channels.py --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from mnist5k import Classifier, TeacherCNN, mnist_5k, quiet_lightning

from litcompress import ChannelPruning
from litcompress._timing import median_seconds, ort_session
from litcompress.export import export_onnx


def train(data, test, epochs: int, seed: int, callbacks: list) -> tuple[torch.nn.Module, float]:
    pl.seed_everything(seed, verbose=False)
    module = Classifier(TeacherCNN(), lr=2e-3)
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
                         num_sanity_val_steps=0)
    trainer.fit(module, DataLoader(data, batch_size=64, shuffle=True))
    model = module.model.eval()
    with torch.no_grad():
        acc = float((model(test.tensors[0]).argmax(1) == test.tensors[1]).float().mean())
    return model, acc


def latencies(models: dict[str, torch.nn.Module], batch: int, repeats: int) -> dict[str, dict[str, float]]:
    x = torch.rand(batch, 784)
    out: dict[str, dict[str, float]] = {name: {} for name in models}
    folder = Path(tempfile.mkdtemp())
    sessions = {}
    for name, model in models.items():
        path = export_onnx(model, x, folder / f"{name}.onnx")
        sessions[name] = ort_session(path, threads=2, spinning=False)  # idle ORT threads do not slow eager runs
    for _ in range(3):  # alternate, so drift in the machine's speed hits both alike
        for name, model in models.items():
            session = sessions[name]
            feed = {session.get_inputs()[0].name: x.numpy()}
            run = lambda s=session, f=feed: s.run(None, f)  # noqa: E731
            out[name].setdefault("onnx", []).append(median_seconds(run, repeats, 3))
            with torch.no_grad():
                out[name].setdefault("eager", []).append(median_seconds(lambda m=model: m(x), repeats, 3))
    return {name: {k: statistics.median(v) * 1e3 for k, v in kinds.items()} for name, kinds in out.items()}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--sparsity", type=float, nargs="+", default=[0.5, 0.75])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/channels.json"))
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    quiet_lightning()
    torch.set_num_threads(2)
    data, test = mnist_5k(args.seed)
    repeats = 30
    if args.quick:
        data = torch.utils.data.TensorDataset(*(t[:512] for t in data.tensors))
        args.epochs, repeats = 2, 3
    models, acc, removed = {}, {}, {}
    models["dense"], acc["dense"] = train(data, test, args.epochs, args.seed, [])
    for sparsity in args.sparsity:
        name = f"{sparsity:.0%} removed"
        pruning = ChannelPruning(sparsity, verbose=False)
        models[name], acc[name] = train(data, test, args.epochs, args.seed, [pruning])
        removed[name] = {k: list(v) for k, v in pruning.removed.items()}
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    flops = {name: flop_count(m) for name, m in models.items()}
    result: dict[str, Any] = {"accuracy": acc, "parameters": params, "flops": flops, "removed": removed,
                              "latency_ms": {}, "args": {k: str(v) for k, v in vars(args).items()}}
    for batch in (256, 1):
        result["latency_ms"][batch] = latencies(models, batch, repeats)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    dense = "dense"
    for name in models:
        print(f"{name:12s} test accuracy {acc[name]:.2%}  parameters {params[name]:,} "
              f"({params[dense] / params[name]:.2f}x fewer)  FLOPs {flops[name]:,} ({flops[dense] / flops[name]:.2f}x "
              "fewer)")
        for batch, lat in result["latency_ms"].items():
            for kind in ("onnx", "eager"):
                d, p = lat[dense][kind], lat[name][kind]
                print(f"    batch {batch:3d} {kind:5s}: {p:.3f} ms ({d / p:.2f}x faster than dense)")
    return result


def flop_count(model: torch.nn.Module) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.zeros(1, 784))
    return int(counter.get_total_flops())


if __name__ == "__main__":
    main()
