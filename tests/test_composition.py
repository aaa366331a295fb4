"""Composition matrix: `Pruning` x `QuantizationAwareTraining` x `DistillationModule` x precision x callback order x
`torch.compile`, on a covering design (every pair of factor levels appears in at least one cell).

Every cell fits 2 epochs of tiny data, then checks that each technique reached its target, that the model exports to
ONNX and ONNX Runtime agrees with PyTorch, and that `CompressionReport` reports the sparsity the model has. Compiled
cells also agree with their eager twin (same masks, close losses and weights). A combination that cannot be honoured
must be refused before the first training step, naming the parameter.

Compilation: `trainer.fit(torch.compile(lightning_module))` fails inside TorchDynamo in Lightning 2.6 with torch 2.13
for any module that logs in `training_step` (`self.log` inspects the signature of the compiled method; not
litcompress's doing), so the cells compile the inner model with `nn.Module.compile()`: names, parameters and layer
classes stay those of the eager model, which is what the callbacks select and convert. One compiled cell uses
TorchInductor (its C++ code generation costs about 50 s on 2 cores); the others use `aot_eager` (TorchDynamo capture and
AOTAutograd, run eagerly), which checks the same capture, guards and recompiles in seconds. A counting backend checks
that every training step and validation batch ran the student as one compiled graph.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, fields, replace
from typing import Any

import lightning.pytorch as pl
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn
from torch._dynamo.backends.registry import lookup_backend

from litcompress import CompressionReport, DistillationModule, Pruning, QuantizationAwareTraining
from litcompress.export import export_onnx
from litcompress.quantization import quantized_layers, quantized_weights
from litcompress.sparsity import check_nm
from tests.models import (
    MLP,
    ConvNet,
    LitClassifier,
    ResumableLoader,
    TransformerClassifier,
    classification_data,
    trainer_kwargs,
)

# One cell per row. `order` only matters (and only varies) when both Pruning and QAT are on. The eager rows cover every
# pair of levels of the other factors; the compiled rows are twins of eager rows (compared with them) that together
# cover every level of every factor.
DESIGN = """
model        prune  qat  distill  precision   order        compile
mlp          0.5    on   off      32-true     prune-first  eager
mlp          2:4    on   on       bf16-mixed  qat-first    eager
mlp          none   off  on       32-true     -            eager
mlp          none   on   off      bf16-mixed  -            eager
transformer  0.5    off  on       bf16-mixed  -            eager
transformer  2:4    off  off      32-true     -            eager
transformer  0.5    on   off      32-true     qat-first    eager
transformer  2:4    on   on       bf16-mixed  prune-first  eager
transformer  none   on   on       32-true     -            eager
mlp          0.5    on   off      32-true     prune-first  inductor
mlp          2:4    on   on       bf16-mixed  qat-first    aot_eager
mlp          none   off  on       32-true     -            aot_eager
transformer  0.5    off  on       bf16-mixed  -            aot_eager
"""


@dataclass(frozen=True)
class Cell:
    model: str
    prune: str
    qat: str
    distill: str
    precision: str
    order: str
    compile: str

    @property
    def id(self) -> str:
        return "-".join(getattr(self, f.name) if f.name in ("model", "precision", "order", "compile")
                        else f"{f.name}_{getattr(self, f.name)}" for f in fields(self))

    @property
    def eager(self) -> Cell:
        return replace(self, compile="eager")


def _parse(table: str) -> list[Cell]:
    header, *rows = [line.split() for line in table.strip().splitlines()]
    assert header == [f.name for f in fields(Cell)]
    return [Cell(*row) for row in rows]


CELLS = _parse(DESIGN)
LEVELS = {"model": ["mlp", "transformer"], "prune": ["none", "0.5", "2:4"], "qat": ["off", "on"],
          "distill": ["off", "on"], "precision": ["32-true", "bf16-mixed"], "order": ["prune-first", "qat-first"],
          "compile": ["eager", "compiled"]}
BACKENDS = ("inductor", "aot_eager")  # the compiled level: TorchInductor (C++ codegen), or AOTAutograd run eagerly
N, BATCH, EPOCHS = 64, 16, 2


def _possible(cell: dict[str, str]) -> bool:
    """Whether a (partial) cell can exist: an order is only chosen when both callbacks are there."""
    if cell.get("order") in ("prune-first", "qat-first"):
        return cell.get("prune", "0.5") != "none" and cell.get("qat", "on") == "on"
    return True


def _level(cell: Cell, factor: str) -> str:
    value = getattr(cell, factor)
    return "compiled" if factor == "compile" and value in BACKENDS else value


def test_design_covers_every_pair_and_pairs_compiled_cells_with_eager_twins():
    for cell in CELLS:
        assert all(_level(cell, f) in levels for f, levels in LEVELS.items() if f != "order"), cell
        assert (cell.order in LEVELS["order"]) == (cell.prune != "none" and cell.qat == "on"), cell
    missing = []
    for (f1, l1), (f2, l2) in itertools.combinations(LEVELS.items(), 2):
        for a, b in itertools.product(l1, l2):
            if _possible({f1: a, f2: b}) and not any(_level(c, f1) == a and _level(c, f2) == b for c in CELLS):
                missing.append(f"{f1}={a}, {f2}={b}")
    assert not missing, missing
    assert all(c.eager in CELLS for c in CELLS if c.compile != "eager")
    assert len(set(CELLS)) == len(CELLS)


# ---------------------------------------------------------------------------------------------- one cell
class Losses(pl.Callback):
    def __init__(self) -> None:
        self.values: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.values.append(float(outputs["loss"] if isinstance(outputs, dict) else outputs))


@dataclass
class Outcome:
    student: nn.Module
    target: nn.Module  # what the callbacks compress and the report measures: the student, or the module around it
    pruning: Pruning | None
    qat: QuantizationAwareTraining | None
    losses: list[float]
    masks: dict[str, torch.Tensor]
    weights: dict[str, torch.Tensor]
    report: dict[str, Any]
    compiled_runs: int  # calls of compiled graphs during the fit


# weight matrices Pruning selects, layers QAT converts (an attention layer with its output projection is one layer)
SELECTED = {"mlp": (3, 3), "transformer": (10, 8)}


def _models(name: str) -> tuple[nn.Module, nn.Module, torch.utils.data.TensorDataset]:
    if name == "mlp":  # student and a slightly larger teacher
        return MLP(), MLP(hidden=48), classification_data((16,), n=N)
    return TransformerClassifier(), TransformerClassifier(dim=24), classification_data((6, 8), n=N)


class CountingBackend:
    """A torch.compile backend that counts the runs of the graphs it compiled (0: the model ran eagerly)."""

    def __init__(self, name: str) -> None:
        self.backend, self.runs = lookup_backend(name), 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]):
        compiled = self.backend(gm, example_inputs)

        def run(*args):
            self.runs += 1
            return compiled(*args)

        return run


def run_cell(cell: Cell, tmp_path) -> Outcome:
    torch.manual_seed(0)
    student, teacher, data = _models(cell.model)
    backend = None
    if cell.compile != "eager":
        torch._dynamo.reset()  # no cache entries from other cells (nor their recompile budget)
        backend = CountingBackend(cell.compile)
        student.compile(backend=backend)
    module = DistillationModule(student, teacher, lr=1e-2) if cell.distill == "on" else LitClassifier(student)
    pruning = {"none": None, "0.5": Pruning(0.5, verbose=False), "2:4": Pruning(pattern="2:4", verbose=False)}[
        cell.prune]
    qat = QuantizationAwareTraining(start=1, verbose=False) if cell.qat == "on" else None
    ordered = [qat, pruning] if cell.order == "qat-first" else [pruning, qat]
    x = data.tensors[0][:8]
    report = CompressionReport(example_input=x, metrics=[], plots=False, latency=False, dirpath=tmp_path)
    losses = Losses()
    callbacks = [c for c in ordered if c is not None] + [report, losses]
    trainer = pl.Trainer(**trainer_kwargs(tmp_path, precision=cell.precision, max_epochs=EPOCHS), callbacks=callbacks)
    trainer.fit(module, ResumableLoader(data, BATCH), ResumableLoader(data, 64))
    assert trainer.global_step == EPOCHS * N // BATCH
    masks = {r.name: (r.tensor != 0).detach().clone() for r in pruning.pruner.refs} if pruning else {}
    weights = {k: v.detach().clone() for k, v in student.state_dict().items()}
    saved = json.loads((tmp_path / "compression_report.json").read_text())
    runs = backend.runs if backend is not None else 0
    target = module.compression_target if isinstance(module, DistillationModule) else module
    return Outcome(student, target, pruning, qat, losses.values, masks, weights, saved, runs)


def check_targets(cell: Cell, out: Outcome) -> None:
    if out.pruning is not None:
        refs = out.pruning.pruner.refs
        assert len(refs) == SELECTED[cell.model][0]  # whichever callback set up first
        zeros = {r.name: int((r.tensor == 0).sum()) for r in refs}
        if cell.prune == "2:4":  # exactly half of every tensor, at most 2 of every 4 inputs kept
            for r in refs:
                assert check_nm(r.tensor, 2, 4, dim=r.input_dim), r.name
                assert zeros[r.name] == r.tensor.numel() // 2, r.name
        else:  # one global threshold: the selected weights together at 50%, to one element per tensor
            total = sum(r.tensor.numel() for r in refs)
            assert abs(sum(zeros.values()) - round(0.5 * total)) <= len(refs), zeros
    if out.qat is not None:
        layers = quantized_layers(out.student)
        assert len(layers) == SELECTED[cell.model][1]
        assert {id(m) for m in out.qat.layers.values()} == {id(m) for m in layers.values()}
        assert all(layer.fake_quant_enabled for layer in layers.values())
    else:
        assert not quantized_layers(out.student)


def check_report(out: Outcome) -> None:
    final = out.report["final"]
    params = dict(out.target.named_parameters())
    zeros = sum(int((p == 0).sum()) for p in params.values())
    assert final["parameters"] == sum(p.numel() for p in params.values())
    assert final["parameters"] - final["nonzero"] == zeros
    assert final["sparsity"] == pytest.approx(zeros / final["parameters"])
    layers = {layer["name"]: layer for layer in final["layers"]}  # named in the target, as the masks
    for name, mask in out.masks.items():
        entry = layers[name]
        assert entry["parameters"] - entry["nonzero"] == int((~mask).sum()), name
    assert final["quantized"] == (out.qat is not None)
    int8 = set(quantized_weights(out.target))  # the report counts each at its bits, the others at 32
    assert {name: layer["bits"] for name, layer in layers.items()} == {n: 8 if n in int8 else 32 for n in layers}


def check_onnx(cell: Cell, out: Outcome, tmp_path) -> None:
    _, _, data = _models(cell.model)
    x = data.tensors[0][:32]
    student = out.student.eval()
    with torch.no_grad():
        expected = student(x).float().numpy()
    path = export_onnx(student, x, tmp_path / "model.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    assert got.shape == expected.shape
    if out.qat is None:
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
        return
    # int8 kernels round where fake quantization only simulates: within 3% of the output range
    assert np.abs(got - expected).max() <= 0.03 * np.abs(expected).max(), np.abs(got - expected).max()
    assert (got.argmax(-1) == expected.argmax(-1)).mean() >= 0.9
    if out.masks:  # the deployed int8 weights keep the pruned zeros (a zero weight quantizes to exactly 0)
        # 8-bit weights are stored uint8 with zero point 128 (exact integer kernels on CPUs without VNNI)
        stored = [torch.tensor(onnx.numpy_helper.to_array(t)) for t in onnx.load(str(path)).graph.initializer]
        weights = [w.int() - 128 if w.dtype == torch.uint8 else w.int() for w in stored
                   if w.dtype in (torch.int8, torch.uint8) and w.dim() >= 2]
        assert len(weights) == len(out.masks)
        assert sum(int((w == 0).sum()) for w in weights) >= sum(int((~m).sum()) for m in out.masks.values())
        if cell.prune == "2:4":  # every layer here sums over dim 1
            assert all(check_nm(w, 2, 4, dim=1) for w in weights)


_EAGER: dict[Cell, Outcome] = {}


def _param(cell: Cell):
    marks = []
    if cell.compile != "eager" or (cell.model == "transformer" and cell.distill == "on"):
        marks.append(pytest.mark.slow)
    if cell.compile == "inductor":  # torch's own: TorchInductor's imports reach a deprecated torch.jit API
        marks.append(pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"))
    return pytest.param(cell, id=cell.id, marks=marks)


@pytest.mark.parametrize("cell", [_param(c) for c in CELLS])
def test_cell(cell, tmp_path):
    out = run_cell(cell, tmp_path)
    check_targets(cell, out)
    check_report(out)
    check_onnx(cell, out, tmp_path)
    if cell.compile == "eager":
        _EAGER[cell] = out
        return
    # each training step and validation batch ran the student as one compiled graph: nothing fell back to eager,
    # nothing broke the graph
    assert out.compiled_runs == EPOCHS * (N // BATCH + 1), out.compiled_runs
    twin = _EAGER.get(cell.eager) or run_cell(cell.eager, tmp_path / "eager")
    assert out.masks.keys() == twin.masks.keys()
    for name, mask in out.masks.items():
        assert torch.equal(mask, twin.masks[name]), name
    tol = dict(rtol=1e-2, atol=1e-2) if cell.precision == "bf16-mixed" else dict(rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out.losses, twin.losses, **tol)
    for name, weight in out.weights.items():
        torch.testing.assert_close(weight, twin.weights[name], **tol, msg=name)


# ---------------------------------------------------------------------------------------------- refusals
class _Steps(pl.Callback):
    def __init__(self) -> None:
        self.steps = 0

    def on_train_batch_start(self, *args) -> None:
        self.steps += 1


@pytest.mark.parametrize("distill", ["off", "on"])
def test_nm_on_a_conv_with_one_input_channel_is_refused_before_the_first_step(tmp_path, distill):
    """2:4 groups run along the input channels: the ConvNet's stem has 1. Refused at setup, naming `pattern`."""
    torch.manual_seed(0)
    student = ConvNet()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    module = DistillationModule(student, ConvNet(width=12)) if distill == "on" else LitClassifier(student)
    steps = _Steps()
    callbacks = [QuantizationAwareTraining(verbose=False), Pruning(pattern="2:4", verbose=False), steps]
    trainer = pl.Trainer(**trainer_kwargs(tmp_path), callbacks=callbacks)
    data = classification_data((1, 8, 8), n=N)
    with pytest.raises(ValueError, match=r"`pattern`.*stem\.0\.weight"):
        trainer.fit(module, ResumableLoader(data, BATCH), ResumableLoader(data, 64))
    assert steps.steps == 0
    assert not quantized_layers(student)  # QAT's conversion is undone
    assert all(torch.equal(v, before[k]) for k, v in student.state_dict().items())
