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
the faster of the all-int8 and all-float exports, then tries each group of layers the other way once (greedy, in
model order), keeping a switch only when the whole model gets faster by ``margin``.

The groups: layers at the same place in repeated blocks (names equal once every index but the last part is
replaced by ``*``, such as ``transformer.h.*.attn.c_attn``), of one class and with the same weight shapes, are
switched together, and so are layers that share a weight (an embedding and its tied LM head); any other layer is a
group of its own. Such layers have the same shapes and neighbours, so they gain or lose alike. On a 6-layer GPT-2
(27 quantized layers, 6 groups) the search over single layers cost 29 exports (about 5 s each on 2 CPU cores; 187
to 283 s in all) and, comparing latencies a few percent apart 27 times, drifted: it kept a mix that ran 7.62 ms
against 6.75 ms for the all-int8 file, because its last check compared with all-float alone. Now the last check
times the result, the all-int8 and the all-float export in the same interleaved rounds: a mix is kept only when it
beats the faster of the two by ``margin``, else that one is returned, so the choice is never slower than either
uniform export there.

Cost: ``G + 2`` comparisons for ``G`` groups (whatever the depth of a transformer), and two or three exports: the
all-int8 and all-float files, and the mix kept, exported for the last check so that the file timed is the file
deployed. The search's other files are the all-int8 export with layers switched to float in the ONNX graph
(``litcompress.export._writer.write_float_layers``, well under a second each; the file is exported instead
when its graph does not say which layer each Q/DQ node belongs to). They compute with the fake-quantized weights
in float, and keep ``MatMul + Add`` where the exporter writes ``Gemm``: the same kernels, and on that GPT-2 0.96
to 1.00 times the exported file's latency, within the margin. The choice there takes 21-23 s instead of 187 s
(``benchmarks/bench_int8_choice.py``).

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

import numbers
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from litcompress._calls import batch_call
from litcompress._extras import ONNX_EXPORT, ONNX_RUNTIME, require
from litcompress._timing import ort_latencies
from litcompress._validation import check_bool, check_fraction, check_int, fail
from litcompress.export._writer import check_runs, write_float_layers, write_onnx
from litcompress.quantization.access import quantized_layers

if TYPE_CHECKING:
    from litcompress.quantization.layers import QuantizedLayer

__all__ = ["Int8Choice", "LayerTiming", "Measure", "choose_int8"]

Measure = Callable[[Sequence[Path]], Sequence[float]]
"""Seconds per run of each ONNX file given, in order (the default times each in ONNX Runtime on the example input).
A file whose name contains ``int8`` has every quantized layer int8; ``float``, none."""


@dataclass(frozen=True)
class LayerTiming:
    """One quantized layer: the whole model's latency with its group int8 and with it float (the groups tried
    before it as chosen, the others as at the start), median milliseconds, and whether it is exported int8.

    Attributes:
        name: the layer.
        int8_ms: the model with the layer's group int8.
        float_ms: the model with the layer's group float.
        int8: whether the layer is exported int8.
        group: the group it was switched with (its own name when alone, else a pattern such as
            ``transformer.h.*.mlp.c_fc``); the layers of a group share these timings and the choice.
    """

    name: str
    int8_ms: float
    float_ms: float
    int8: bool
    group: str = ""


@dataclass(frozen=True)
class Int8Choice:
    """What :func:`choose_int8` measured and chose; ``print`` it for the table. Pass it to
    :func:`~litcompress.export.export_onnx` as ``int8=`` to export the choice.

    Attributes:
        int8_layers: the quantized layers exported with integer kernels (the others export as float).
        layers: one row per quantized layer in force, in model order (one line per group in the table).
        exported_ms: median latency of the chosen export in the last check (``None`` when the model has no
            quantized layer in force).
        float_ms: the all-float export, in the last check.
        all_int8_ms: the all-int8 export (what ``export_onnx`` writes by default), in the last check.
        batch_size: the example input's batch size, at which everything was timed.
        threads: ONNX Runtime's intra-op threads.
        fell_back: the search's result lost the last check to the faster uniform export (all-int8 or all-float),
            which is chosen instead.
        note: why the result is uniform, when the search did not end there or int8 pays nowhere; empty otherwise.
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
        """One line per group of layers: group, int8 ms, float ms, chosen; then the whole-model totals and the note."""
        lines = [f"int8 or float per quantized layer (ONNX Runtime, batch {self.batch_size}, {self.threads} threads; "
                 "whole-model median ms)"]
        groups: dict[str, list[LayerTiming]] = {}
        for row in self.layers:
            groups.setdefault(row.group or row.name, []).append(row)
        shown = {(name if len(rows) == 1 else f"{name} ({len(rows)} layers)"): rows[0] for name, rows in groups.items()}
        if shown:
            width = max(5, *(len(name) for name in shown))
            lines.append(f"{'layer':{width}s} {'int8 ms':>9s} {'float ms':>10s}   chosen")
            lines += [f"{name:{width}s} {row.int8_ms:9.3f} {row.float_ms:10.3f}   {'int8' if row.int8 else 'float'}"
                      for name, row in shown.items()]
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
    and all-float exports, try each group of layers (the same layer in every repeated block, layers sharing a
    weight; any other layer alone) the other way once, keep a switch when the model runs at least ``margin``
    faster; then time the result, exported, against both uniform exports in the same rounds and keep it only if it
    beats the faster of them by ``margin``, else return that one. The choice is never slower than the all-int8 or
    the all-float export in that last check. Only those files are exported; the search's others are made from the
    all-int8 file. The model's state (each layer's ``fake_quant_enabled``, train/eval mode) is restored.

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
        margin: how much faster (a fraction) a switch, and a mixed file in the last check, must make the model to
            be kept: a mix must pay clearly.
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
    in_force = {name: layer for name, layer in quantized_layers(model).items() if layer.fake_quant_enabled}
    if not in_force:
        return Int8Choice((), (), None, None, None, batch_size, threads,
                          note="no quantized layer in force: the model exports as float")
    require(*ONNX_EXPORT, what="choose_int8")
    if measure is None:
        require(*ONNX_RUNTIME, what="choose_int8")
        measure = _ort_measure(args, kwargs, threads, per_round, warmup, rounds)
    groups = _groups(in_force)
    every = frozenset(in_force)
    was_training = model.training
    model.eval()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            check_runs(model, args, kwargs)  # once: the candidate exports below run no trial
            files: dict[frozenset[str], Path] = {}
            exported: set[frozenset[str]] = set()  # files written by the exporter, not made from the all-int8 one

            def write(config: frozenset[str], real: bool) -> Path:
                if config in files and (config in exported or not real):
                    return files[config]  # one file per configuration: the uniform ones serve to the end
                label = "int8" if config == every else "float" if not config else f"mix{len(files)}"
                path = files[config] = Path(tmp) / f"candidate_{len(files)}_{label}.onnx"
                if real or config in (every, frozenset()) or not write_float_layers(files[every], path,
                                                                                   every - config, every):
                    write_onnx(model, args, kwargs, path, dynamic_batch=dynamic_batch, int8_layers=sorted(config))
                    exported.add(config)
                return path

            def timed(*configs: frozenset[str], real: bool = False) -> list[float]:
                seconds = list(measure([write(c, real) for c in configs]))
                if len(seconds) != len(configs) or not all(
                        isinstance(s, numbers.Real) and not isinstance(s, bool) and s > 0 for s in seconds):
                    fail("measure", f"a callable returning {len(configs)} positive numbers (seconds per run)",
                         seconds)
                return [1e3 * float(s) for s in seconds]

            current, tried, totals, note = _search(groups, every, timed, margin, batch_size)
    finally:
        model.train(was_training)
    group_of = {name: group for group, members in groups.items() for name in members}
    rows = tuple(LayerTiming(name, *tried[group_of[name]], name in current, group_of[name]) for name in in_force)
    exported_ms, float_ms, int8_ms, fell_back = totals
    return Int8Choice(tuple(n for n in in_force if n in current), rows, exported_ms, float_ms, int8_ms, batch_size,
                      threads, fell_back, note)


def _groups(layers: Mapping[str, QuantizedLayer]) -> dict[str, tuple[str, ...]]:
    """The layers switched together, by group name, in model order: layers whose names are equal once every index
    but the last part is replaced by ``*`` (the same place in repeated blocks), of one class and with the same
    weight shapes, are one group named by that pattern; layers that share a weight (an embedding and its tied LM
    head) are one group (the weight is stored once, int8 or float), named ``a + b``; any other layer is a group of
    its own, under its name.

    >>> from torch import nn
    >>> from litcompress.quantization import QuantConfig, convert_
    >>> model = nn.ModuleDict({"h": nn.ModuleList(nn.ModuleDict({"fc": nn.Linear(4, 4)}) for _ in range(3)),
    ...                        "head": nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))})
    >>> _groups(convert_(model, QuantConfig(), ["h.0.fc", "h.1.fc", "h.2.fc", "head.0", "head.1"]))
    {'h.*.fc': ('h.0.fc', 'h.1.fc', 'h.2.fc'), 'head.0': ('head.0',), 'head.1': ('head.1',)}
    """
    found: dict[tuple[Any, ...], list[str]] = {}
    for name, layer in layers.items():
        parts = name.split(".")
        pattern = ".".join("*" if part.isdigit() and i < len(parts) - 1 else part for i, part in enumerate(parts))
        shapes = tuple(tuple(layer.weight_tensor(key).shape) for key in layer.weight_quantizers)
        found.setdefault((pattern, type(layer), shapes), []).append(name)
    named: list[tuple[str, list[str]]] = []
    for (pattern, _, _), members in found.items():
        taken = len(members) > 1 and any(name == pattern for name, _ in named)
        named.append((members[0] if len(members) == 1 else pattern if not taken
                      else f"{members[0]} and {len(members) - 1} alike", members))
    weights = {name: {id(layers[name].weight_tensor(key)) for key in layers[name].weight_quantizers}
               for name in layers}
    merged: list[tuple[str, list[str]]] = []
    for name, members in named:  # a group sharing a weight with an earlier one joins it
        held = set().union(*(weights[m] for m in members))
        into = next((g for g in merged if held & set().union(*(weights[m] for m in g[1]))), None)
        if into is None:
            merged.append((name, list(members)))
        else:
            merged[merged.index(into)] = (f"{into[0]} + {name}", into[1] + members)
    order = {name: i for i, name in enumerate(layers)}
    return {name: tuple(sorted(members, key=order.__getitem__)) for name, members in merged}


def _search(groups: Mapping[str, tuple[str, ...]], every: frozenset[str],
            timed: Callable[..., list[float]], margin: float, batch_size: int,
            ) -> tuple[frozenset[str], dict[str, tuple[float, float]], tuple[float, float, float, bool], str]:
    """The greedy search over ``groups`` and the last check (see :func:`choose_int8`): the int8 layers chosen, the
    (int8 ms, float ms) of each group as tried, (chosen ms, all-float ms, all-int8 ms, fell back) from the last
    check, and the note."""
    none: frozenset[str] = frozenset()

    def faster(a: float, b: float) -> bool:
        return a < b * (1.0 - margin)

    float_ms, int8_ms = timed(none, every)
    current, current_ms = (every, int8_ms) if int8_ms < float_ms else (none, float_ms)
    tried: dict[str, tuple[float, float]] = {}
    for group, members in groups.items():
        flipped = current ^ frozenset(members)
        if len(groups) == 1:  # the flipped file is the other of the two just timed
            flipped_ms = int8_ms if flipped == every else float_ms
        else:
            flipped_ms, current_ms = timed(flipped, current)
        tried[group] = (flipped_ms, current_ms) if members[0] in flipped else (current_ms, flipped_ms)
        if faster(flipped_ms, current_ms):
            current, current_ms = flipped, flipped_ms
    if len(groups) > 1:  # the last check: the result and both uniform files, in the same rounds
        if current in (none, every):
            float_ms, int8_ms = timed(none, every)
            current_ms = int8_ms if current == every else float_ms
        else:
            current_ms, float_ms, int8_ms = timed(current, none, every, real=True)  # the file deployed
    uniform, uniform_ms, label = (every, int8_ms, "all-int8") if int8_ms < float_ms else (none, float_ms, "all-float")
    if current not in (none, every) and faster(current_ms, uniform_ms):
        return current, tried, (current_ms, float_ms, int8_ms, False), ""
    if current == uniform:
        note = f"int8 pays on no layer at batch {batch_size} here: every layer exports as float" if not current else ""
        return current, tried, (current_ms, float_ms, int8_ms, False), note
    exports = "int8" if uniform else "as float"
    if current in (none, every):
        note = (f"fell back to {label}: the search ended at {'all-int8' if current else 'all-float'}, which ran "
                f"{current_ms:.3f} ms against {uniform_ms:.3f} ms in the last check, so every layer exports {exports}")
    else:
        note = (f"fell back to {label}: the mix ran {current_ms:.3f} ms against {int8_ms:.3f} ms for all-int8 and "
                f"{float_ms:.3f} ms for all-float in the last check (a mix must beat both by {margin:.0%}), so every "
                f"layer exports {exports}")
    return uniform, tried, (uniform_ms, float_ms, int8_ms, True), note


def _ort_measure(args: tuple[Tensor, ...], kwargs: dict[str, Tensor], threads: int, repeats: int, warmup: int,
                 rounds: int) -> Measure:
    """Median seconds per run of each file in ONNX Runtime on the example input, the files taking turns: in each
    round every file runs ``warmup`` + ``repeats`` times in a block (in reverse order every other round), and a
    file's latency is the median of its rounds' medians. The sessions do not spin (see
    :func:`~litcompress._timing.ort_session`): an idle session's spinning threads would slow the next one's runs.
    Without spinning, each parallel operation waits for its threads to wake: a cost per operation, so if anything
    it favours the float graph, which has fewer operations than a Q/DQ one."""

    def measure(paths: Sequence[Path]) -> list[float]:
        return ort_latencies(paths, args, kwargs, threads, repeats, warmup, rounds)

    return measure
