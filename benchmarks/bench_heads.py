"""Attention heads and MLP neurons removed from Hugging Face transformers: what it buys in parameters, FLOPs and time.

Tiny-to-small BERT, GPT-2 and Llama configs with random weights (nothing downloaded): dense, and with half the heads
(half the key/value heads with their query heads under grouped-query attention) and half the MLP neurons of every
block pruned by :class:`~litcompress.sparsity.channels.ChannelPruner` (magnitude, the same code path as
``ChannelPruning(0.5)``) and removed. Rows: parameters, FLOPs (``torch.utils.flop_counter``, one batch),
the largest difference between the removed and the masked model's outputs, and fp32 latency in eager PyTorch and in
ONNX Runtime (median of repeated runs, dense and pruned alternating in one process). Random weights measure cost,
not accuracy: what pruning heads costs in accuracy depends on training (see the examples).

    python benchmarks/bench_heads.py            # about 2 minutes on 2 CPU cores
    python benchmarks/bench_heads.py --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from litcompress._timing import median_seconds, ort_feed, ort_session
from litcompress.export import export_onnx
from litcompress.sparsity.channels import ChannelPruner
from litcompress.sparsity.hf_heads import HFAttention, PackedAttention


def build(kind: str, width: int, layers: int, heads: int, vocab: int, context: int) -> torch.nn.Module:
    import transformers

    transformers.logging.set_verbosity_error()
    if kind == "bert":
        return transformers.BertModel(transformers.BertConfig(
            vocab_size=vocab, hidden_size=width, num_hidden_layers=layers, num_attention_heads=heads,
            intermediate_size=4 * width, max_position_embeddings=context), add_pooling_layer=False)
    if kind == "gpt2":
        return transformers.GPT2Model(transformers.GPT2Config(
            vocab_size=vocab, n_positions=context, n_embd=width, n_layer=layers, n_head=heads))
    return transformers.LlamaModel(transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads // 2, max_position_embeddings=context))


def output(model: torch.nn.Module, x: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**x).last_hidden_state


def flops(model: torch.nn.Module, x: dict[str, torch.Tensor]) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(**x)
    return int(counter.get_total_flops())


def measure(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(0)
    dense = build(kind, args.width, args.layers, args.heads, 256, args.context).eval()
    x = {"input_ids": torch.randint(0, 256, (args.batch, args.context))}
    pruned = copy.deepcopy(dense)
    layers = [n for n, m in pruned.named_modules() if isinstance(m, torch.nn.Linear) or type(m).__name__ == "Conv1D"]
    pruner = ChannelPruner(pruned, x, layers, sparsity=args.sparsity)
    groups = {g.name: g.channels for g in pruner.groups}
    attention = sum(1 for g in pruner.groups if isinstance(g.remover, (HFAttention, PackedAttention)))
    pruner.update(1.0)
    masked = output(pruned, x)
    removed = pruner.remove()
    diff = float((output(pruned, x) - masked).abs().max())
    models = {"dense": dense, "pruned": pruned}
    folder = Path(tempfile.mkdtemp())
    sessions = {name: ort_session(export_onnx(m, x, folder / f"{kind}_{name}.onnx"), threads=args.threads,
                                  spinning=False) for name, m in models.items()}
    eager: dict[str, list[float]] = {name: [] for name in models}
    ort: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(args.rounds):  # alternate, so drift in the machine's speed hits both alike
        for name, model in models.items():
            with torch.no_grad():
                eager[name].append(median_seconds(lambda m=model: m(**x), args.repeats, 2))
            session = sessions[name]
            feed = ort_feed(session, (), x)
            ort[name].append(median_seconds(lambda s=session, f=feed: s.run(None, f), args.repeats, 2))
    row: dict[str, Any] = {"groups": len(groups), "attention_groups": attention,
                           "removed": {k: list(v) for k, v in removed.items()},
                           "max_abs_diff_removed_vs_masked": diff, "output_scale": float(masked.abs().max())}
    for name, model in models.items():
        row[name] = {"parameters": sum(p.numel() for p in model.parameters()), "flops": flops(model, x),
                     "eager_ms": 1e3 * sorted(eager[name])[len(eager[name]) // 2],
                     "ort_ms": 1e3 * sorted(ort[name])[len(ort[name]) // 2]}
    return row


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", nargs="+", default=["bert", "gpt2", "llama"])
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/heads.json"))
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny models, few repeats")
    args = parser.parse_args(argv)
    if args.quick:
        args.width, args.layers, args.heads, args.context, args.batch = 32, 1, 4, 16, 2
        args.rounds, args.repeats = 1, 2
    torch.set_num_threads(args.threads)
    results = {kind: measure(kind, args) for kind in args.kinds}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "results": results},
                                   indent=1))
    print(f"{args.sparsity:.0%} of heads and MLP neurons removed; width {args.width}, {args.layers} layers, "
          f"{args.heads} heads, batch {args.batch} x {args.context} tokens, {args.threads} threads")
    print(f"{'model':8s} {'parameters':>21s} {'FLOPs':>9s} {'eager':>22s} {'ONNX Runtime':>22s} "
          f"{'|removed-masked|':>17s}")
    for kind, r in results.items():
        d, p = r["dense"], r["pruned"]
        print(f"{kind:8s} {d['parameters']:>9,d} -> {p['parameters']:>9,d} {d['flops'] / p['flops']:8.2f}x "
              f"{d['eager_ms']:7.2f} -> {p['eager_ms']:6.2f} ms ({d['eager_ms'] / p['eager_ms']:.2f}x) "
              f"{d['ort_ms']:7.2f} -> {p['ort_ms']:6.2f} ms ({d['ort_ms'] / p['ort_ms']:.2f}x) "
              f"{r['max_abs_diff_removed_vs_masked']:10.1e}")
    return results


if __name__ == "__main__":
    main()
