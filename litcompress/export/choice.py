"""`choose_int8`: per quantized layer, int8 or float, whichever ONNX Runtime runs faster on a real batch.

Integer kernels pay on wide layers; on narrow ones the QuantizeLinear/DequantizeLinear conversions around them cost
more than the integer arithmetic saves. A small MNIST student CNN (conv 8->16, fc 400->64->10), quantized W8A8,
ran 2.55 ms in ONNX Runtime as int8 and 0.75 ms exported as fp32 (batch 256, 2 threads), while an MLP
784-512-256-10 ran ~3x faster as int8 than as fp32.

How the choice is made: by timing whole-model exports, not layers alone. Whether a layer runs on an integer kernel
depends on its neighbours: ONNX Runtime fuses ``DequantizeLinear -> Gemm -> QuantizeLinear`` into ``QGemm`` only
when the next layer quantizes the output again, and a uint8 tensor between layers changes the kernels of the
pooling and reshaping in between. Measured (batch 256, 2 threads): timed alone, every layer of that MLP was faster
as float (512->256: 0.69 ms int8, 0.62 ms float) while the all-int8 MLP ran 3.4x faster than the all-float one
(0.77 vs 2.59 ms), and each single layer switched to int8 made the float MLP slower; the student's conv 8->16 was
faster as int8 alone (0.82 vs 0.87 ms) and made the whole student 2x slower. So :func:`choose_int8` starts from
the faster of the all-int8 and all-float exports, then tries each quantized layer the other way once (greedy, in
model order), keeping a switch only when the whole model gets faster by ``margin``. A last check times the result
against the all-float export and falls back to all-float unless the result is faster: the file exported is never
slower than the fp32 export, as measured. Cost: ``L + 2`` exports and timings for ``L`` quantized layers.

The timings above were measured with the export of the previous release, which stored 8-bit weights as ``int8``
(ONNX Runtime's U8S8 kernels). 8-bit weights now export as ``uint8`` with zero point 128, which runs on the U8U8
kernels: exact on x86 CPUs without VNNI, where U8S8 saturates, but slower there than U8S8
(``benchmarks/bench_int8_kernels.py``). So the int8 figures above would differ today; the reasoning and the method
stand.

>>> import torch
>>> from torch import nn
>>> from litcompress.quantization import QuantConfig, convert_
>>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
>>> for layer in convert_(model, QuantConfig(activation_bits=None), ["0", "2"]).values():
...     layer.fake_quant_enabled = True
>>> int8_fast = lambda paths: [0.001 if "int8" in p.name else 0.002 for p in paths]  # a stand-in for ORT timing
>>> choice = choose_int8(model, torch.randn(16, 4), measure=int8_fast)
>>> choice.int8_layers
('0', '2')
>>> print(choice)  # doctest: +NORMALIZE_WHITESPACE
int8 or float per quantized layer (ONNX Runtime, batch 16, ... threads; whole-model median ms)
layer   int8 ms   float ms   chosen
0         1.000      2.000   int8
2         1.000      2.000   int8
all int8 1.000 ms | all float 2.000 ms | exported 1.000 ms, int8 in 2 of 2 layers
"""

from __future__ import annotations

import functools
import numbers
import statistics
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from litcompress._calls import batch_call
from litcompress._extras import ONNX_EXPORT, ONNX_RUNTIME, require
from litcompress._timing import median_seconds, ort_feed, ort_session
from litcompress._validation import check_bool, check_fraction, check_int, fail
from litcompress.export._writer import check_runs, write_onnx
from litcompress.quantization.access import quantized_layers

__all__ = ["Int8Choice", "LayerTiming", "Measure", "choose_int8"]

Measure = Callable[[Sequence[Path]], Sequence[float]]
"""Seconds per run of each ONNX file given, in order (the default times each in ONNX Runtime on the example input).
A file whose name contains ``int8`` has every quantized layer int8; ``float``, none."""


@dataclass(frozen=True)
class LayerTiming:
    """One quantized layer: the whole model's latency with this layer int8 and with it float (the layers tried
    before it as chosen, the others as at the start), median milliseconds, and whether it is exported int8."""

    name: str
    int8_ms: float
    float_ms: float
    int8: bool


@dataclass(frozen=True)
class Int8Choice:
    """What :func:`choose_int8` measured and chose; ``print`` it for the table. Pass it to
    :func:`~litcompress.export.export_onnx` as ``int8=`` to export the choice.

    Attributes:
        int8_layers: the quantized layers exported with integer kernels (the others export as float).
        layers: one row per quantized layer in force, in model order.
        exported_ms: median latency of the chosen export (``None`` when the model has no quantized layer in force).
        float_ms: the all-float export.
        all_int8_ms: the all-int8 export (what ``export_onnx`` writes by default).
        batch_size: the example input's batch size, at which everything was timed.
        threads: ONNX Runtime's intra-op threads.
        fell_back: the search's result was not faster than the all-float export in the last check, so everything
            is float.
        note: why the result is all-float, when it is; empty otherwise.
    """

    int8_layers: tuple[str, ...]
    layers: tuple[LayerTiming, ...]
    exported_ms: float | None
    float_ms: float | None
    all_int8_ms: float | None
    batch_size: int
    threads: int
    fell_back: bool = False
    note: str = ""

    def table(self) -> str:
        """The per-layer table: layer, int8 ms, float ms, chosen; then the whole-model totals and the note."""
        lines = [f"int8 or float per quantized layer (ONNX Runtime, batch {self.batch_size}, {self.threads} threads; "
                 "whole-model median ms)"]
        if self.layers:
            width = max(5, *(len(row.name) for row in self.layers))
            lines.append(f"{'layer':{width}s} {'int8 ms':>9s} {'float ms':>10s}   chosen")
            lines += [f"{row.name:{width}s} {row.int8_ms:9.3f} {row.float_ms:10.3f}   {'int8' if row.int8 else 'float'}"
                      for row in self.layers]
        if self.exported_ms is not None and self.float_ms is not None and self.all_int8_ms is not None:
            lines.append(f"all int8 {self.all_int8_ms:.3f} ms | all float {self.float_ms:.3f} ms | exported "
                         f"{self.exported_ms:.3f} ms, int8 in {len(self.int8_layers)} of {len(self.layers)} layers")
        if self.note:
            lines.append(self.note)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values."""
        out = asdict(self)
        out["int8_layers"] = list(self.int8_layers)
        out["layers"] = [asdict(row) for row in self.layers]
        return out


def choose_int8(
    model: nn.Module,
    example_input: Tensor | Mapping[str, Tensor],
    *,
    threads: int | None = None,
    repeats: int = 50,
    warmup: int = 2,
    rounds: int = 10,
    margin: float = 0.05,
    dynamic_batch: bool = True,
    measure: Measure | None = None,
) -> Int8Choice:
    """Choose, per quantized layer, int8 or float for ONNX export, by timing whole-model exports in ONNX Runtime.

    Greedy and measured (see the module's text for why not layer by layer): start from the faster of the all-int8
    and all-float exports, try each quantized layer the other way once, keep a switch when the model runs at least
    ``margin`` faster, then check the result against the all-float export and fall back to it unless faster. The
    model's state (each layer's ``fake_quant_enabled``, train/eval mode) is restored.

    Args:
        model: a model trained with :class:`~litcompress.callbacks.QuantizationAwareTraining` (or converted with
            :func:`~litcompress.quantization.convert_`); only layers with fake quantization on are candidates.
        example_input: a real batch at the batch size you deploy (int8 kernels run faster on zeros than on real
            data, and whether they pay depends on the batch size); a tensor or a mapping of tensors.
        threads: ONNX Runtime intra-op threads (default: ``torch.get_num_threads()``), fixed for every timing.
        repeats: timed runs per file in all, as in :func:`~litcompress.report.summarize` (split evenly over the
            ``rounds``, at least one each); more than the report's 30 by default because a choice compares files
            whose latencies can differ by a few percent.
        warmup: untimed runs before each round's timed runs.
        rounds: rounds per comparison; the files compared take turns in short blocks, and each file's latency is
            the median of its rounds' medians (so a slow spell of the machine hits every file alike).
        margin: how much faster (a fraction) a switch must make the model to be kept: int8 must pay clearly.
        dynamic_batch: as in :func:`~litcompress.export.export_onnx`; pass what you will export with, so the
            files timed are the file deployed.
        measure: replaces the timing: called with a list of ONNX files, returns seconds per run of each (for a
            different execution provider, or for tests).

    Returns:
        The choice, with the per-layer timings (``print`` shows the table).

    Raises:
        TypeError: ``model``, ``example_input`` or ``measure`` of the wrong type.
        ValueError: a count or ``margin`` out of range, or the model does not run on ``example_input``.
    """
    if not isinstance(model, nn.Module):
        fail("model", "a torch.nn.Module", type(model).__name__, exc=TypeError)
    args, kwargs = batch_call(example_input)
    check_int("threads", threads, minimum=1, allow_none=True)
    check_int("repeats", repeats, minimum=1)
    check_int("warmup", warmup, minimum=0)
    check_int("rounds", rounds, minimum=1)
    per_round = -(-repeats // rounds)  # at least one timed run per file in each round
    check_fraction("margin", margin)
    check_bool("dynamic_batch", dynamic_batch)
    if measure is not None and not callable(measure):
        fail("measure", "a callable taking a list of ONNX files and returning seconds per run of each, or None",
             type(measure).__name__, exc=TypeError)
    threads = torch.get_num_threads() if threads is None else threads
    batch_size = len([*args, *kwargs.values()][0])
    layers = [name for name, layer in quantized_layers(model).items() if layer.fake_quant_enabled]
    if not layers:
        return Int8Choice((), (), None, None, None, batch_size, threads,
                          note="no quantized layer in force: the model exports as float")
    require(*ONNX_EXPORT, what="choose_int8")
    if measure is None:
        require(*ONNX_RUNTIME, what="choose_int8")
        measure = _ort_measure(args, kwargs, threads, per_round, warmup, rounds)
    none: frozenset[str] = frozenset()
    every = frozenset(layers)

    def faster(a: float, b: float) -> bool:
        return a < b * (1.0 - margin)

    was_training = model.training
    model.eval()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            check_runs(model, args, kwargs)  # once: the candidate exports below run no trial
            files: dict[frozenset[str], Path] = {}

            def timed(*configs: frozenset[str]) -> list[float]:
                for config in configs:
                    if config not in files:  # one export per configuration
                        label = "int8" if config == every else "float" if config == none else f"mix{len(files)}"
                        files[config] = Path(tmp) / f"candidate_{len(files)}_{label}.onnx"
                        write_onnx(model, args, kwargs, files[config], dynamic_batch=dynamic_batch,
                                   int8_layers=sorted(config))
                seconds = list(measure([files[c] for c in configs]))
                if len(seconds) != len(configs) or not all(
                        isinstance(s, numbers.Real) and not isinstance(s, bool) and s > 0 for s in seconds):
                        fail("measure", f"a callable returning {len(configs)} positive numbers (seconds per run)",
                         seconds)
                return [1e3 * float(s) for s in seconds]

            float_ms, int8_ms = timed(none, every)
            current, current_ms = (every, int8_ms) if faster(int8_ms, float_ms) else (none, float_ms)
            tried: list[tuple[str, float, float]] = []
            for name in layers:
                flipped = current ^ {name}
                if len(layers) == 1:  # the flipped file is the other of the two just timed
                    flipped_ms = int8_ms if flipped == every else float_ms
                else:
                    flipped_ms, current_ms = timed(flipped, current)
                with_int8, without = (flipped_ms, current_ms) if name in flipped else (current_ms, flipped_ms)
                tried.append((name, with_int8, without))
                if faster(flipped_ms, current_ms):
                    current, current_ms = flipped, flipped_ms
            fell_back, note = False, ""
            if current == every:
                current_ms, float_ms = timed(every, none)
                int8_ms = current_ms
            elif current != none:
                current_ms, float_ms, int8_ms = timed(current, none, every)
            if current != none and current_ms >= float_ms:
                fell_back = True
                note = (f"fell back to float: the chosen mix ran {current_ms:.3f} ms against {float_ms:.3f} ms for "
                        "the all-float export in the last check, so every layer exports as float")
                current, current_ms = none, float_ms
            elif current == none:
                float_ms = current_ms  # its latest timing
                note = f"int8 pays on no layer at batch {batch_size} here: every layer exports as float"
    finally:
        model.train(was_training)
    rows = tuple(LayerTiming(name, a, b, name in current) for name, a, b in tried)
    return Int8Choice(tuple(n for n in layers if n in current), rows, current_ms, float_ms, int8_ms, batch_size,
                      threads, fell_back, note)


def _ort_measure(args: tuple[Tensor, ...], kwargs: dict[str, Tensor], threads: int, repeats: int, warmup: int,
                 rounds: int) -> Measure:
    """Median seconds per run of each file in ONNX Runtime on the example input, the files taking turns: in each
    round every file runs ``warmup`` + ``repeats`` times in a block (in reverse order every other round), and a
    file's latency is the median of its rounds' medians. The sessions do not spin (see
    :func:`~litcompress._timing.ort_session`): an idle session's spinning threads would slow the next one's runs.
    Without spinning, each parallel operation waits for its threads to wake: a cost per operation, so if anything
    it favours the float graph, which has fewer operations than a Q/DQ one."""

    def measure(paths: Sequence[Path]) -> list[float]:
        sessions = [ort_session(path, threads, spinning=False) for path in paths]
        feeds = [ort_feed(session, args, kwargs) for session in sessions]
        samples: list[list[float]] = [[] for _ in paths]
        order = list(range(len(paths)))
        for round_ in range(rounds):
            for i in order if round_ % 2 == 0 else order[::-1]:
                samples[i].append(median_seconds(functools.partial(sessions[i].run, None, feeds[i]), repeats, warmup))
        return [statistics.median(s) for s in samples]

    return measure
