"""Compact files of a pruned, quantized LeNet-300-100 against its fp32 file, and against Deep Compression's 40x.

LeNet-300-100 (784-300-100-10) keeps Han et al.'s fractions of its weights (8% / 9% / 26% for fc1 / fc2 / fc3, the
largest magnitudes of each layer), its three layers converted for QAT with 8-bit and 4-bit per-channel weights
(weight-only: activation quantizers store nothing). Sizes are the bytes of real files:

- fp32: the state_dict in float32 as a safetensors file (as `summarize` measures it);
- format 2: `save_compressed` as it was before format 3, every sparse tensor's positions a bitmask (written by the
  current code with bitmasks only, the layout JSON as format 2 wrote it; the file loads as format 2);
- format 3: `save_compressed` now, each tensor's positions in its smallest encoding (mask, gaps or runs).

The sizes depend on how many weights are kept and where, not on their values: random weights (seed 0) are the
default; ``--trained`` prunes LeNet-300-100 while training it on MNIST-5k instead (``examples/prune_mnist.py``).

Random weights make the kept positions a uniformly random choice of k among n, and then no exact encoding of them
takes fewer than log2 C(n, k) bits on average (an entropy coder comes close; fixed-width codes cannot). The last
columns replace the stored positions by that bound: the smallest file any exact position encoding could give with
the values, scales, biases and header as they are.

    python benchmarks/bench_compact.py              # a few seconds
    python benchmarks/bench_compact.py --trained    # trains for 30 epochs first (about 2.5 minutes on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from litcompress.quantization import QuantConfig, _positions, convert_, fake_quant
from litcompress.quantization._layout import checksum
from litcompress.quantization.compact import load_compressed, save_compressed

HAN_KEPT = {"net.0": 0.08, "net.2": 0.09, "net.4": 0.26}  # Han et al. 2015, Table 1
DEEP_COMPRESSION = 40  # Han et al. 2016, Table 1: LeNet-300-100 1070 KB -> 27 KB (pruning, 6-bit weights, Huffman)


def lenet(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Module()
    model.net = nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))
    with torch.no_grad():
        for name, kept in HAN_KEPT.items():
            w = model.get_submodule(name).weight.reshape(-1)
            top = w.abs().topk(round(kept * w.numel())).indices
            w.copy_(torch.zeros_like(w).index_copy_(0, top, w[top]))
    return model


def trained(seed: int, epochs: int) -> nn.Module:
    from mnist5k import quiet_lightning
    from prune_mnist import run

    quiet_lightning()
    args = argparse.Namespace(epochs=epochs, start=5, end=min(20, epochs), sparsity=None, seed=seed, quiet=True)
    model, acc = run(args, prune=True)
    print(f"trained and pruned on MNIST-5k: {acc:.2%} held-out accuracy")
    return model


def fp32_bytes(model: nn.Module, path: Path) -> int:
    save_file({k: v.detach().float().contiguous() for k, v in model.state_dict().items()}, str(path))
    return path.stat().st_size


def format_2_bytes(model: nn.Module, path: Path) -> int:
    """The file format 2 wrote: bitmasks, the layout as ``json.dumps`` spaced it; checked to load as format 2."""
    kinds, _positions.KINDS = _positions.KINDS, ("mask",)
    try:
        save_compressed(model, path)
    finally:
        _positions.KINDS = kinds
    with safe_open(str(path), framework="pt") as f:
        text = json.dumps(json.loads(f.metadata()["layout"]))
    tensors, fmt = load_file(str(path)), "litcompress.compact/2"
    save_file(tensors, str(path), metadata={"format": fmt, "layout": text, "sha256": checksum(fmt, text, tensors)})
    load_compressed(copy.deepcopy(model), path)
    return path.stat().st_size


def bound_bytes(n: int, k: int) -> float:
    return (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)) / math.log(2) / 8


def measure(base: nn.Module, bits: int, tmp: Path) -> dict:
    model = copy.deepcopy(base)
    convert_(model, QuantConfig(weight_bits=bits, activation_bits=None), list(HAN_KEPT))
    with fake_quant(model, True):
        path = save_compressed(model, tmp / f"w{bits}.safetensors")
        old = format_2_bytes(model, tmp / f"w{bits}_v2.safetensors")
        ints = {name: model.get_submodule(name).weight_quantizers["weight"].integers(
            model.get_submodule(name).weight)[0] for name in HAN_KEPT}
    with safe_open(str(path), framework="pt") as f:
        layout = json.loads(f.metadata()["layout"])
        stored = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    fresh = copy.deepcopy(model)
    load_compressed(fresh, path)
    with fake_quant(model, True):
        for name in HAN_KEPT:
            layer = model.get_submodule(name)
            assert torch.equal(fresh.get_submodule(name).weight, layer.weight_quantizers["weight"](layer.weight))
    layers = []
    for name, q in ints.items():
        entry = layout[f"{name}.weight"]
        kind = next(k for k in ("mask", "gaps", "runs") if k in entry or (k == "mask" and "sparse" in entry))
        n, k = q.numel(), int((q != 0).sum())
        layers.append({"layer": name, "elements": n, "nonzero": k,
                       "encoding": kind if kind == "mask" else f"{kind}, {entry[kind]}-bit codes",
                       "positions": len(stored[f"{name}.weight:{kind}"]), "bitmask": -(-n // 8),
                       "bound": bound_bytes(n, k)})
    size = path.stat().st_size
    parts = {"weight values": 0, "positions": 0, "scales": 0, "biases": 0}
    for key, t in stored.items():
        part = {"values": "biases" if ".bias:" in key else "weight values", "scale": "scales"}.get(
            key.rpartition(":")[2], "positions")
        parts[part] += t.numel() * t.element_size()
    parts["header (layout, checksum, tensor index)"] = size - sum(parts.values())
    positions = sum(r["positions"] for r in layers)
    best = size - positions + sum(r["bound"] for r in layers)
    return {"bits": bits, "fp32": fp32_bytes(model, tmp / "fp32.safetensors"), "format2": old, "format3": size,
            "best_exact": best, "layers": layers, "parts": parts}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trained", action="store_true", help="prune while training on MNIST-5k (not random)")
    parser.add_argument("--epochs", type=int, default=30, help="with --trained")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON")
    args = parser.parse_args(argv)
    base = trained(args.seed, args.epochs) if args.trained else lenet(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        results = [measure(base, bits, Path(tmp)) for bits in (8, 4)]
    kept = [r["nonzero"] / r["elements"] for r in results[0]["layers"]]
    print(f"\nLeNet-300-100, {'pruned while trained' if args.trained else 'random weights'} (seed {args.seed}), kept "
          + " / ".join(f"{x:.0%}" for x in kept) + f" of fc1 / fc2 / fc3; fp32 file {results[0]['fp32']:,} bytes")
    print("\n| weights | fp32 (bytes) | format 2: bitmask (bytes) | vs fp32 | format 3 (bytes) | vs fp32 "
          "| positions at log2 C(n, k) | vs fp32 |\n|---|---|---|---|---|---|---|---|")
    for r in results:
        fp32 = r["fp32"]
        print(f"| int{r['bits']} | {fp32:,} | {r['format2']:,} | {fp32 / r['format2']:.1f}x | {r['format3']:,} | "
              f"**{fp32 / r['format3']:.1f}x** | {r['best_exact']:,.0f} | {fp32 / r['best_exact']:.1f}x |")
    print(f"| Deep Compression (pruning, 6-bit weights, Huffman coding) | | | | | {DEEP_COMPRESSION}x | | |")
    print("\n| layer | elements | nonzero | positions stored as | bytes | bitmask bytes | log2 C(n, k) bytes |"
          "\n|---|---|---|---|---|---|---|")
    for row in results[1]["layers"]:
        print(f"| {row['layer']} | {row['elements']:,} | {row['nonzero']:,} | {row['encoding']} | "
              f"{row['positions']:,} | {row['bitmask']:,} | {row['bound']:,.0f} |")
    print("\nint4 file, " + ", ".join(f"{k} {v:,}" for k, v in results[1]["parts"].items()) + " bytes; fp32 / 40 = "
          f"{results[1]['fp32'] / DEEP_COMPRESSION:,.0f} bytes")
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    return {"results": results}


if __name__ == "__main__":
    main()
