"""Scale check (issue 12): Pruning and QuantizationAwareTraining on a GPT-2-small-sized decoder, on CPU.

A Hugging Face ``GPT2LMHeadModel`` built from a ``GPT2Config`` (12 layers, width 768, 12 heads, vocabulary 50,257,
1,024 positions; random weights, nothing downloaded; 124M parameters, the LM head tied to the token embedding)
trains for a few AdamW steps on random token ids (``labels = input_ids``) inside a real ``lightning`` ``Trainer.fit``
on CPU. Every configuration runs in its own subprocess, so its peak RSS (``ru_maxrss`` of the child) is its own;
configurations are interleaved over ``--repeats`` rounds.

Configurations:

- ``plain``: no callback.
- ``pruning``: ``Pruning(0.5, interval="step", start=0, end=4)`` (cubic schedule, one global magnitude threshold;
  default frequency, so masks are computed at step 0 and at step 4, the end of batch 3).
- ``pruning-f1``: the same with ``frequency=1``: masks recomputed at steps 0, 1, 2, 3 and 4.
- ``qat``: ``QuantizationAwareTraining(start=0, interval="step")`` (W8A8 defaults).
- ``both``: ``pruning`` and ``qat`` together.
- ``qat-ab`` (on request): ``qat`` with fake quantization switched off in every even batch (the converted layers then
  run their original forward): an in-process A/B, step against neighbouring step, far less sensitive to other jobs
  on the machine than comparing processes. ``--ab-steps`` (14) steps.
- ``pruning-layer`` (on request): ``pruning`` with ``scope="layer"`` (a threshold per tensor instead of one global
  threshold).

Step time: from ``on_train_batch_start`` (first callback) to ``on_train_batch_end`` (last callback), so it holds
forward, backward, the optimizer step and whatever the litcompress callbacks do in their batch hooks (a mask
update included). The first ``--warmup`` steps are left out. Memory: ``ru_maxrss`` of the child (whole process,
model construction included), plus the peak and current RSS at every phase of every step (batch start, before
backward, after backward, after the optimizer step, batch end), which shows which phase set the peak.

    python benchmarks/bench_scale.py --threads 1       # 2 rounds x 5 configurations, ~10 minutes on 2 CPU cores
    python benchmarks/bench_scale.py --threads 1 --repeats 1 --configs plain qat-ab pruning-layer   # ~3 minutes
    python benchmarks/bench_scale.py --quick           # 2-layer, width-128 smoke run (~1 minute)

Step times are also taken as process CPU time (``time.process_time``), which other jobs on a shared machine disturb
less than wall time (with one torch thread; with two, a thread spinning while the other is descheduled counts too).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

DEFAULT_CONFIGS = ("plain", "pruning", "pruning-f1", "qat", "both")
CONFIGS = (*DEFAULT_CONFIGS, "qat-ab", "pruning-layer")
PHASES = ("batch_start", "before_backward", "after_backward", "after_optimizer_step", "batch_end")


# ---------------------------------------------------------------------------------------------- the child process
def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def run_child(args: argparse.Namespace) -> dict[str, Any]:
    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader, Dataset
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    from litcompress import Pruning, QuantizationAwareTraining
    from litcompress.quantization import quantized_layers

    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    pl.seed_everything(0, verbose=False)
    after_import = _maxrss_mb()

    class RandomTokens(Dataset):
        def __init__(self, n: int, seq: int, vocab: int) -> None:
            g = torch.Generator().manual_seed(0)
            self.ids = torch.randint(0, vocab, (n, seq), generator=g)

        def __len__(self) -> int:
            return len(self.ids)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"input_ids": self.ids[i], "labels": self.ids[i]}

    class LM(pl.LightningModule):
        """A dict batch in, ``model(**batch).loss`` out (no DistillationModule)."""

        def __init__(self, model: torch.nn.Module, lr: float = 1e-4) -> None:
            super().__init__()
            self.model, self.lr = model, lr

        def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
            return self.model(**batch).loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=self.lr)

    class Probe:
        """Shared state of the two clock callbacks: step times and (peak, current) RSS at every phase."""

        def __init__(self) -> None:
            self.t0 = self.c0 = 0.0
            self.in_batch = False
            self.times: list[float] = []
            self.cpu: list[float] = []  # process CPU time (all threads): robust to other jobs on the machine
            self.phases: list[dict[str, tuple[float, float]]] = []

        def mark(self, phase: str) -> None:
            self.phases[-1][phase] = (round(_maxrss_mb(), 1), round(_rss_mb(), 1))

    class ClockStart(pl.Callback):  # first in the callback list: its batch-start hook runs before the others'
        def __init__(self, probe: Probe) -> None:
            self.p = probe
            self.handle: Any = None

        def on_train_start(self, trainer, pl_module):
            self.p.before_fit = (round(_maxrss_mb(), 1), round(_rss_mb(), 1))
            self.handle = trainer.optimizers[0].register_step_post_hook(lambda *_: self.p.mark("after_optimizer_step"))

        def on_train_end(self, trainer, pl_module):
            self.handle.remove()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.p.phases.append({})
            self.p.mark("batch_start")
            self.p.t0, self.p.c0 = time.perf_counter(), time.process_time()
            self.p.in_batch = True

        def on_before_backward(self, trainer, pl_module, loss):
            self.p.mark("before_backward")

        def on_after_backward(self, trainer, pl_module):
            self.p.mark("after_backward")

    class ClockEnd(pl.Callback):  # last in the list: its batch-end hook runs after the others' (mask updates)
        def __init__(self, probe: Probe) -> None:
            self.p = probe

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.p.times.append(time.perf_counter() - self.p.t0)
            self.p.cpu.append(time.process_time() - self.p.c0)
            self.p.in_batch = False
            self.p.mark("batch_end")

    class Alternate(pl.Callback):
        """``qat-ab``: fake quantization on in odd batches only, off (the original layers' forward) in even ones:
        an A/B of the same model in one process, step by step, so load from other jobs hits both sides alike."""

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            for layer in quantized_layers(pl_module).values():
                layer.fake_quant_enabled = batch_idx % 2 == 1

    config = GPT2Config(n_layer=args.layers, n_embd=args.width, n_head=args.heads, vocab_size=args.vocab,
                        n_positions=args.positions)
    model = GPT2LMHeadModel(config)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    after_model = _maxrss_mb()

    callbacks: list[pl.Callback] = []
    pruning = qat = None
    updates: list[dict[str, Any]] = []  # every call of Pruning._maybe_update that recomputed masks
    steps = args.ab_steps if args.child == "qat-ab" else args.steps
    if args.child in ("pruning", "pruning-f1", "both", "pruning-layer"):
        pruning = Pruning(0.5, interval="step", start=0, end=args.prune_end,
                          frequency=1 if args.child == "pruning-f1" else None,
                          scope="layer" if args.child == "pruning-layer" else None, verbose=False)
        callbacks.append(pruning)
        inner = pruning._maybe_update

        def timed_update(trainer: pl.Trainer, _inner: Any = inner, _p: Any = pruning) -> None:
            before, peak, t, c = _p._last_point, _maxrss_mb(), time.perf_counter(), time.process_time()
            _inner(trainer)
            if _p._last_point != before:
                updates.append({"step": trainer.global_step, "batch": len(probe.times) if probe.in_batch else None,
                                "ms": 1e3 * (time.perf_counter() - t), "cpu_ms": 1e3 * (time.process_time() - c),
                                "maxrss_before": round(peak, 1),
                                "maxrss_after": round(_maxrss_mb(), 1)})

        pruning._maybe_update = timed_update  # instance attribute: times the mask updates in place, changes nothing
    if args.child in ("qat", "both", "qat-ab"):
        qat = QuantizationAwareTraining(start=0, interval="step", verbose=False)
        callbacks.append(qat)
    if args.child == "qat-ab":
        callbacks.append(Alternate())
    probe = Probe()
    data = RandomTokens(steps * args.batch, args.seq, args.vocab)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, callbacks=[ClockStart(probe), *callbacks, ClockEnd(probe)])
    wall = time.perf_counter()
    trainer.fit(LM(model), DataLoader(data, batch_size=args.batch, shuffle=False))
    wall = time.perf_counter() - wall

    out: dict[str, Any] = {
        "config": args.child, "params": n_params, "threads": torch.get_num_threads(),
        "peak_rss_mb": _maxrss_mb(), "maxrss_after_import_mb": after_import, "maxrss_after_model_mb": after_model,
        "before_fit": probe.before_fit, "step_s": probe.times, "cpu_s": probe.cpu, "mask_updates": updates,
        "phases": probe.phases, "fit_wall_s": wall,
        "param_mb": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20,
    }
    if pruning is not None and pruning.pruner is not None:
        pr = pruning.pruner
        out["pruned_tensors"] = len(pr.refs)
        out["pruned_elements"] = sum(r.tensor.numel() for r in pr.refs)
        out["final_sparsity"] = pr.global_sparsity()
        out["pruning_state_mb"] = sum(t.numel() * t.element_size() for store in (pr.masks, pr.scores, pr.snapshot)
                                      for t in store.values()) / 2**20
    if qat is not None:
        layers = quantized_layers(model)
        kinds: dict[str, int] = {}
        for layer in layers.values():
            kinds[layer.original_class.__name__] = kinds.get(layer.original_class.__name__, 0) + 1
        conv1d = [n for n, m in model.named_modules() if type(m).__name__ == "Conv1D" or
                  getattr(getattr(m, "original_class", None), "__name__", "") == "Conv1D"]
        out["quantized_layers"] = len(layers)
        out["quantized_kinds"] = kinds
        out["conv1d_total"] = len(conv1d)
        out["conv1d_quantized"] = sum(1 for n in conv1d if n in layers)
        out["conv1d_fake_quant_on"] = sum(1 for n in conv1d if n in layers and layers[n].fake_quant_enabled)
        out["quantized_names_sample"] = sorted(layers)[:6]
    return out


# ---------------------------------------------------------------------------------------------- the parent process
def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _update_batches(run: dict[str, Any]) -> set[int]:
    """Batches whose timed span holds a mask update (one in ``on_train_start`` falls in no batch: ``None``)."""
    return {u["batch"] for u in run.get("mask_updates", []) if u["batch"] is not None}


def _steps(run: dict[str, Any], key: str, warmup: int, between: bool = False) -> list[float]:
    """Per-step seconds (``step_s`` wall, ``cpu_s`` process CPU) after the warm-up; ``between``: mask-update steps
    left out."""
    skip = _update_batches(run) if between else set()
    return [t for i, t in enumerate(run.get(key, [])) if i >= warmup and i not in skip]


def summarise(runs: list[dict[str, Any]], warmup: int) -> dict[str, Any]:
    by: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        by.setdefault(r["config"], []).append(r)
    rows: dict[str, Any] = {}
    for name in CONFIGS:
        if name not in by:
            continue
        rs = by[name]
        row: dict[str, Any] = {"runs": len(rs), "peak_rss_mb": _median([r["peak_rss_mb"] for r in rs]),
                               "peak_rss_runs": [round(r["peak_rss_mb"]) for r in rs],
                               "rss_before_fit_mb": _median([r["before_fit"][1] for r in rs])}
        for key, label in (("step_s", "wall"), ("cpu_s", "cpu")):
            medians = [_median(_steps(r, key, warmup)) for r in rs]
            row[f"{label}_ms"] = 1e3 * _median(medians)
            row[f"{label}_ms_runs"] = [round(1e3 * m) for m in medians]
            row[f"{label}_between_ms"] = 1e3 * _median([_median(_steps(r, key, warmup, True)) for r in rs])
            row[f"{label}_max_ms"] = 1e3 * _median([max(_steps(r, key, warmup)) for r in rs])
        r0 = rs[0]
        where = None  # the (step, phase) at which the run's peak RSS was first reached
        for i, ph in enumerate(r0["phases"]):
            where = next(((i, p) for p in PHASES if p in ph and ph[p][0] >= r0["peak_rss_mb"] - 0.5), None)
            if where:
                break
        row["peak_reached_at"] = where
        if r0.get("mask_updates"):
            ups = [u for r in rs for u in r["mask_updates"]]
            row["mask_updates"] = len(r0["mask_updates"])
            row["mask_update_ms"] = _median([u["ms"] for u in ups])
            row["mask_update_cpu_ms"] = _median([u.get("cpu_ms", float("nan")) for u in ups])
            row["mask_update_peak_raise_mb"] = max(u["maxrss_after"] - u["maxrss_before"] for u in ups)
        if name == "qat-ab":  # pairs (fake quantization off in batch 2i, on in batch 2i + 1) after the warm-up
            for key, label in (("step_s", "wall"), ("cpu_s", "cpu")):
                ratios = [r[key][i + 1] / r[key][i] for r in rs for i in range(warmup + warmup % 2, len(r[key]) - 1, 2)]
                row[f"ab_{label}_ratio"] = _median(ratios)
                row[f"ab_{label}_ratios"] = [round(x, 3) for x in ratios]
                row[f"ab_{label}_off_ms"] = 1e3 * _median([r[key][i] for r in rs for i in range(warmup, len(r[key]))
                                                           if i % 2 == 0])
                row[f"ab_{label}_on_ms"] = 1e3 * _median([r[key][i] for r in rs for i in range(warmup, len(r[key]))
                                                          if i % 2 == 1])
        for key in ("pruned_tensors", "pruned_elements", "final_sparsity", "pruning_state_mb", "quantized_layers",
                    "quantized_kinds", "conv1d_total", "conv1d_quantized", "conv1d_fake_quant_on"):
            if key in r0:
                row[key] = r0[key]
        rows[name] = row
    if "plain" in rows:
        base = rows["plain"]
        for row in rows.values():
            row["peak_vs_plain"] = row["peak_rss_mb"] / base["peak_rss_mb"]
            row["extra_mb"] = row["peak_rss_mb"] - base["peak_rss_mb"]
            for label in ("wall", "cpu"):
                row[f"{label}_vs_plain"] = row[f"{label}_ms"] / base[f"{label}_ms"]
                row[f"{label}_between_vs_plain"] = row[f"{label}_between_ms"] / base[f"{label}_ms"]
    return rows


def table(rows: dict[str, Any], warmup: int) -> str:
    nan = float("nan")
    lines = [f"| config | peak RSS (MB) | vs plain | peak first reached (step, phase) | CPU ms/step, median of steps "
             f"{warmup}+ | vs plain | between mask updates vs plain | slowest step CPU ms | wall ms/step (per run) "
             "| wall vs plain |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['peak_rss_mb']:.0f} | {r.get('peak_vs_plain', nan):.2f}x | {r['peak_reached_at']} | "
            f"{r['cpu_ms']:.0f} | {r.get('cpu_vs_plain', nan):.2f}x | {r.get('cpu_between_vs_plain', nan):.2f}x | "
            f"{r['cpu_max_ms']:.0f} | {r['wall_ms']:.0f} ({', '.join(map(str, r['wall_ms_runs']))}) | "
            f"{r.get('wall_vs_plain', nan):.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS), choices=CONFIGS)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps per fit (max_steps)")
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the step-time median")
    parser.add_argument("--ab-steps", type=int, default=14, help="optimizer steps of the qat-ab configuration")
    parser.add_argument("--prune-end", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--positions", type=int, default=1024)
    parser.add_argument("--quick", action="store_true", help="2 layers, width 128, vocabulary 1000, 1 round")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "scale.json")
    parser.add_argument("--child", choices=CONFIGS, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.layers, args.width, args.heads, args.vocab, args.positions, args.repeats = 2, 128, 4, 1000, 128, 1
    if args.child:
        result = run_child(args)
        args.child_out.write_text(json.dumps(result))
        return

    args.out.parent.mkdir(parents=True, exist_ok=True)
    passthrough = ["--steps", args.steps, "--ab-steps", args.ab_steps, "--warmup", args.warmup, "--prune-end",
                   args.prune_end, "--batch", args.batch, "--seq", args.seq, "--threads", args.threads, "--layers",
                   args.layers, "--width", args.width, "--heads", args.heads, "--vocab", args.vocab, "--positions",
                   args.positions]
    runs = []
    started = time.perf_counter()
    for rnd in range(args.repeats):
        for name in args.configs:  # interleaved: one run of every configuration per round
            child_out = args.out.with_name(f"{args.out.stem}_{name}_r{rnd}.json")
            cmd = [sys.executable, __file__, "--child", name, "--child-out", str(child_out),
                   *map(str, passthrough)]
            t = time.perf_counter()
            subprocess.run(cmd, check=True)
            r = json.loads(child_out.read_text())
            r["round"] = rnd
            runs.append(r)
            steps = ", ".join(f"{1e3 * s:.0f}" for s in r["step_s"])
            print(f"round {rnd} {name:<11} peak RSS {r['peak_rss_mb']:7.0f} MB, steps (ms) {steps} "
                  f"[{time.perf_counter() - t:.0f} s]", flush=True)
    rows = summarise(runs, args.warmup)
    import torch

    meta = {
        "argv": sys.argv, "machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
        "torch": torch.__version__, "params": runs[0]["params"], "wall_s": time.perf_counter() - started,
        "load_before": os.getloadavg(),
    }
    args.out.write_text(json.dumps({"meta": meta, "rows": rows, "runs": runs}, indent=1))
    print(f"\n{meta['params']:,} parameters, {args.batch} x {args.seq} tokens, {args.steps} steps, "
          f"{args.threads} threads, {len(runs)} runs in {meta['wall_s']:.0f} s\n")
    print(table(rows, args.warmup))
    for name, r in rows.items():
        keys = ("pruned", "final", "pruning_state", "quantized", "conv1d", "mask_", "ab_")
        extra = {k: r[k] for k in r if k.startswith(keys)}
        if extra:
            print(f"{name}: {extra}")
    print(f"\nraw data: {args.out}")


if __name__ == "__main__":
    main()
