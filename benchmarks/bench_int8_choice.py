"""`choose_int8` on a 6-layer GPT-2: wall time, and the chosen file's latency against all-int8 and all-float.

Issue 22 item 8: on a 6-layer GPT-2 (27 quantized layers) the search over single layers took 283 s and kept a mix
that ran 7.62 ms against 6.75 ms for the all-int8 file in the same run. This script measures the search as it is
now (the same layer of every repeated block switched as one group; a last check against both uniform files) and,
with ``--grouping``, the alternatives it was chosen over: ``layer`` (every layer alone: the previous search, with
today's last check) and ``block`` (every block's layers together: ``transformer.h.3`` one group).

The model: a Hugging Face ``GPT2LMHeadModel`` from ``GPT2Config(n_layer=6, n_embd=256, n_head=4, vocab_size=256,
n_positions=64)`` (byte vocabulary, as in ``examples/distill_gpt2.py``; 4.9 M parameters), random initial weights,
then ``--steps`` steps of ``QuantizationAwareTraining()`` (its default selection: 27 layers, the 24 block
projections, both embeddings and the tied LM head) on the Python standard library's own text, so that the
activation ranges are observed on real bytes. ``choose_int8`` runs with its defaults on a held-out batch of
``--batch`` windows of 64 bytes, with 2 threads. Reported per run: the wall time of ``choose_int8`` (and the part
of it spent exporting), the number of groups and of files exported, the choice, and the latencies of the chosen
file, the all-int8 and the all-float file in its last check (the same interleaved rounds). A confirmation follows
(not counted in the wall time): the three files written by ``export_onnx`` and timed again in ``--confirm-rounds``
alternating rounds of 20 runs. ``--fidelity`` also times the files the search makes from the all-int8 export (one
group float, or every layer) against the export of the same mix, in the same rounds.

    python benchmarks/bench_int8_choice.py                              # the default search, 6 layers
    python benchmarks/bench_int8_choice.py --grouping kind block layer  # and the alternatives (several minutes)
    python benchmarks/bench_int8_choice.py --layers 2 6 12              # how the time grows with depth
    python benchmarks/bench_int8_choice.py --fidelity                   # rewritten search files vs exports
    python benchmarks/bench_int8_choice.py --quick                      # smoke run (a tiny GPT-2)
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from bench_int8_kernels import cpu_features
from distill_gpt2 import Chunks, gpt2, stdlib_bytes
from mnist5k import quiet_lightning

import litcompress.export.choice as choice_module
from litcompress import QuantizationAwareTraining
from litcompress._timing import median_seconds, ort_feed, ort_session
from litcompress.export import choose_int8, export_onnx
from litcompress.export._writer import write_float_layers
from litcompress.quantization import quantized_layers

warnings.filterwarnings("ignore")
CONTEXT = 64


class LM(pl.LightningModule):
    """A causal LM whose ``forward(input_ids)`` gives the logits (what is exported); trained on its own loss."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids).logits

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self.model(**batch).loss

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


def by_block(layers: dict[str, Any]) -> dict[str, tuple[str, ...]]:
    """``--grouping block``: the layers of each repeated block together (named up to the block's index), every other
    layer alone."""
    groups: dict[str, list[str]] = {}
    for name in layers:
        parts = name.split(".")
        index = next((i for i, part in enumerate(parts[:-1]) if part.isdigit()), None)
        groups.setdefault(name if index is None else ".".join(parts[:index + 1]), []).append(name)
    return {name: tuple(members) for name, members in groups.items()}


GROUPINGS = {"kind": choice_module._groups,  # the default: the same layer of every block together
             "block": by_block,
             "layer": lambda layers: {name: (name,) for name in layers}}  # the previous search


def qat_model(layers: int, width: int, heads: int, steps: int, batch: int, train_text: bytes) -> LM:
    torch.manual_seed(0)
    module = LM(gpt2(width, layers, heads, CONTEXT))
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_model_summary=False, enable_progress_bar=False, num_sanity_val_steps=0,
                         callbacks=[QuantizationAwareTraining(verbose=False)])
    trainer.fit(module, DataLoader(Chunks(train_text, CONTEXT, limit=steps * batch), batch_size=batch, shuffle=True))
    return module.eval()


def time_files(paths: list[Path], x: torch.Tensor, rounds: int, repeats: int = 20, per_round: bool = False) -> Any:
    """Median ms of each file over ``rounds`` round medians, the files taking turns (reversed every other round);
    ``per_round``: each file's round medians."""
    sessions = [ort_session(p, 2, spinning=False) for p in paths]
    feeds = [ort_feed(s, (x,), {}) for s in sessions]
    samples: list[list[float]] = [[] for _ in paths]
    for round_ in range(rounds):
        order = range(len(paths)) if round_ % 2 == 0 else reversed(range(len(paths)))
        for i in order:
            samples[i].append(1e3 * median_seconds(functools.partial(sessions[i].run, None, feeds[i]), repeats, 3))
    return samples if per_round else [statistics.median(s) for s in samples]


def run(module: LM, x: torch.Tensor, grouping: str, rewrite: bool, choose_kwargs: dict[str, Any],
        confirm_rounds: int, folder: Path) -> dict[str, Any]:
    exports = {"count": 0, "seconds": 0.0}
    write = choice_module.write_onnx

    def counted(*args: Any, **kwargs: Any) -> None:
        start = time.perf_counter()
        write(*args, **kwargs)
        exports["count"] += 1
        exports["seconds"] += time.perf_counter() - start

    saved = choice_module.write_onnx, choice_module._groups, choice_module.write_float_layers
    choice_module.write_onnx, choice_module._groups = counted, GROUPINGS[grouping]  # type: ignore[assignment]
    if not rewrite:  # every candidate exported, as before
        choice_module.write_float_layers = lambda *args: False  # type: ignore[assignment]
    try:
        start = time.perf_counter()
        choice = choose_int8(module, x, **choose_kwargs)
        wall = time.perf_counter() - start
    finally:
        choice_module.write_onnx, choice_module._groups, choice_module.write_float_layers = saved  # type: ignore
    result: dict[str, Any] = {
        "grouping": grouping, "rewrite": rewrite, "wall_s": wall, "exports": exports["count"],
        "export_s": exports["seconds"],
        "groups": len({row.group for row in choice.layers}), "layers": len(choice.layers),
        "int8_layers": list(choice.int8_layers), "fell_back": choice.fell_back, "table": str(choice),
        "last_check_ms": {"chosen": choice.exported_ms, "all_int8": choice.all_int8_ms, "all_float": choice.float_ms}}
    if confirm_rounds:
        paths = [export_onnx(module, x, folder / f"{grouping}_{name}.onnx", int8=int8)
                 for name, int8 in (("chosen", choice), ("int8", "all"), ("float", "none"))]
        result["confirm_ms"] = dict(zip(("chosen", "all_int8", "all_float"), time_files(paths, x, confirm_rounds)))
    return result


def fidelity(module: LM, x: torch.Tensor, rounds: int, folder: Path) -> dict[str, dict[str, float]]:
    """``--fidelity``: for each group, and for all layers, the all-int8 export with those layers switched to float
    by ``write_float_layers`` (what the search times) against ``export_onnx`` of the same mix; the per-round ratio
    rewritten / exported, median [min, max] over ``rounds`` rounds of all files in turn (> 1: the rewritten file is
    slower)."""
    layers = [name for name, layer in quantized_layers(module).items() if layer.fake_quant_enabled]
    int8 = export_onnx(module, x, folder / "fidelity_int8.onnx", int8="all")
    cases = {**choice_module._groups({n: quantized_layers(module)[n] for n in layers}), "every layer": tuple(layers)}
    paths: list[Path] = []
    for i, members in enumerate(cases.values()):
        assert write_float_layers(int8, folder / f"rewritten_{i}.onnx", set(members), layers)
        paths += [folder / f"rewritten_{i}.onnx", export_onnx(module, x, folder / f"exported_{i}.onnx",
                                                                int8=[n for n in layers if n not in members])]
    samples = time_files(paths, x, rounds, per_round=True)
    out = {}
    for i, name in enumerate(cases):
        ratios = [a / b for a, b in zip(samples[2 * i], samples[2 * i + 1])]
        out[name] = {"ratio": statistics.median(ratios), "min": min(ratios), "max": max(ratios),
                     "rewritten_ms": statistics.median(samples[2 * i]),
                     "exported_ms": statistics.median(samples[2 * i + 1])}
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 layers of width 32, few timed runs")
    parser.add_argument("--layers", type=int, nargs="+", default=[6], help="GPT-2 depths to measure")
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2, help="windows of 64 bytes in the timed batch")
    parser.add_argument("--steps", type=int, default=20, help="QAT steps before the choice")
    parser.add_argument("--grouping", nargs="+", choices=list(GROUPINGS), default=["kind"])
    parser.add_argument("--rewrite", nargs="+", choices=["on", "off"], default=["on"],
                        help="off: export every candidate file instead of making it from the all-int8 export")
    parser.add_argument("--fidelity", action="store_true",
                        help="also time each rewritten search file against the export of the same mix")
    parser.add_argument("--confirm-rounds", type=int, default=20, help="0: no confirmation")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "int8_choice.json")
    args = parser.parse_args(argv)
    quiet_lightning()
    torch.set_num_threads(2)
    choose_kwargs: dict[str, Any] = {}
    if args.quick:
        args.layers, args.width, args.heads, args.steps, args.confirm_rounds = [2], 32, 2, 2, 2
        choose_kwargs = {"repeats": 4, "rounds": 2}
    import onnxruntime as ort

    cpu = cpu_features()
    load_start = os.getloadavg()[0]
    print(f"CPU: {cpu['model']}; " + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in cpu["flags"].items())
          + f"; onnxruntime {ort.__version__}; torch {torch.__version__}; load average {load_start:.2f}", flush=True)
    train_text, held_text = stdlib_bytes()
    x = Chunks(held_text, CONTEXT, limit=args.batch).windows  # (batch, 64) byte ids
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for layers in args.layers:
            module = qat_model(layers, args.width, args.heads, args.steps, args.batch, train_text)
            if args.fidelity:
                check = fidelity(module, x, max(args.confirm_rounds, 2), Path(tmp))
                results.append({"n_layer": layers, "fidelity": check})
                print(f"\n{layers} layers: rewritten / exported file, the same layers float (median [min, max] of "
                      "per-round ratios):")
                for name, r in check.items():
                    print(f"  {name}: {r['ratio']:.3f} [{r['min']:.3f}, {r['max']:.3f}] ({r['rewritten_ms']:.2f} vs "
                          f"{r['exported_ms']:.2f} ms)", flush=True)
            for grouping in args.grouping:
                for rewrite in args.rewrite:
                    r = {"n_layer": layers, **run(module, x, grouping, rewrite == "on", choose_kwargs,
                                                  args.confirm_rounds, Path(tmp)), "load_average": os.getloadavg()[0]}
                    results.append(r)
                    print(f"\n{layers} layers, grouping {grouping}, rewrite {rewrite} ({r['wall_s']:.0f} s):\n"
                          f"{r['table']}", flush=True)
    meta = {"cpu": cpu, "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, Python "
            f"{platform.python_version()}", "onnxruntime": ort.__version__, "torch": torch.__version__,
            "width": args.width, "heads": args.heads, "batch": args.batch, "context": CONTEXT, "steps": args.steps,
            "quick": args.quick, "date": datetime.date.today().isoformat(), "load_average_start": load_start}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=1))

    print("\n| layers | grouping | candidates | groups | files exported | choose_int8 wall (export part) | "
          "int8 layers chosen | last check: chosen / all-int8 / all-float ms | "
          "confirmation: chosen / all-int8 / all-float ms | load average after |\n" + "|---" * 10 + "|")
    for r in results:
        if "fidelity" in r:
            continue
        last, again = r["last_check_ms"], r.get("confirm_ms")
        confirm = "-" if again is None else " / ".join(f"{again[k]:.2f}" for k in ("chosen", "all_int8", "all_float"))
        print(f"| {r['n_layer']} ({r['layers']} quantized) | {r['grouping']} | "
              f"{'rewritten' if r['rewrite'] else 'exported'} | {r['groups']} | {r['exports']} | "
              f"{r['wall_s']:.0f} s ({r['export_s']:.0f} s) | {len(r['int8_layers'])} of {r['layers']}"
              f"{' (fell back)' if r['fell_back'] else ''} | "
              + " / ".join(f"{last[k]:.2f}" for k in ("chosen", "all_int8", "all_float"))
              + f" | {confirm} | {r['load_average']:.2f} |")
    print(json.dumps({k: meta[k] for k in ("machine", "onnxruntime", "torch", "batch", "steps", "date")}))
    return {"meta": meta, "results": results}


if __name__ == "__main__":
    main()
