"""`CompressionReport`: the model before and after a fit, side by side: size, sparsity, bits, FLOPs, latency, metrics.

The baseline is measured when the fit starts: the model itself, or, for a
:class:`~litcompress.modules.DistillationModule`, its teacher. The final model is measured when training ends
(after the last validation, before the loggers are finalized). The table is printed on rank zero, written as JSON
(and PNG charts) to the trainer's log directory, and its headline numbers are sent to the loggers as
``compression/...`` scalars. A failure while reporting is a warning: the report never crashes a finished fit.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import move_data_to_device, rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from litcompress._calls import batch_call
from litcompress._extras import ONNX_RUNTIME, install_hint, missing
from litcompress._validation import check_int, fail
from litcompress.callbacks._base import _compression_target, _log_metrics
from litcompress.callbacks._inputs import first_batch_inputs
from litcompress.distributed import gather_model, is_sharded_model
from litcompress.quantization.access import quantized_layers
from litcompress.report.summary import ModelSummary, summarize
from litcompress.report.table import compare, deployed_latencies, format_table, speed_change

__all__ = ["CompressionReport"]

_SCHEMA = 1


class CompressionReport(Callback):
    """Measure the model at fit start and fit end; print, save and log the comparison.

    Baseline metrics: for a :class:`~litcompress.modules.DistillationModule`, the teacher's, which it logs as
    ``teacher/<key>`` (e.g. ``teacher/val/acc``); otherwise the values Lightning's sanity-check validation logs
    before the first training step. That check covers ``num_sanity_val_steps`` batches (2 by default): pass
    ``Trainer(num_sanity_val_steps=-1)`` for the whole validation set (the report notes a partial baseline).
    Final metrics: the last validation's values. The baseline is saved in checkpoints, so a resumed fit reports
    against the original model.

    Args:
        example_input: one input batch for FLOPs and latency (the first dimension of its tensors is the batch
            size): a tensor, a tuple of positional inputs or a mapping of keyword inputs, as everywhere in
            litcompress; default: ``input_shape`` when given, else the LightningModule's ``example_input_array``,
            else the first training batch (its inputs: a tuple's first item, a dict's tensors but ``labels``, as a
            Hugging Face model takes them). Use real data when latency matters: integer kernels can run faster on
            zeros (measured: 2.8 ms on zeros, 3.5 ms on real digits for the MNIST pipeline's int8 student in ONNX
            Runtime).
        metrics: logged metric keys to show (e.g. ``"val/acc"``, ``"val/f1"``, ``"val/loss"``).
        input_shape: a batch shape such as ``[256, 784]``: zeros of that shape are measured (handy in YAML). Not
            with ``example_input``.
        latency: time forward passes (torch eager; also ONNX Runtime when the model is quantized: its all-int8 and
            fp32 exports and the file you would deploy, int8 only where it pays, measured by
            :func:`~litcompress.export.choose_int8` at ``L + 2`` exports for ``L`` quantized layers). The table's
            ``speed, after vs before`` row compares what each model deploys (ONNX Runtime when both were timed
            there, else torch eager), and a warning gives the numbers when the compressed model is slower.
        repeats: timed passes per latency figure (the median is reported).
        plots: also save ``compression_layers.png`` and ``compression_tradeoff.png`` (needs matplotlib).
        dirpath: where to write ``filename`` and the plots; default: ``trainer.log_dir``.
        filename: the JSON file's name.

    Example:
        >>> import tempfile
        >>> import lightning.pytorch as pl
        >>> from lightning.pytorch.demos.boring_classes import BoringModel
        >>> from litcompress import Pruning
        >>> report = CompressionReport(input_shape=[4, 32], metrics=[], latency=False, plots=False,
        ...                            dirpath=tempfile.mkdtemp())
        >>> trainer = pl.Trainer(max_epochs=1, callbacks=[Pruning(0.8, verbose=False), report], logger=False,
        ...                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        >>> trainer.fit(BoringModel())  # prints the table (and writes compression_report.json)
        >>> before, after = report.report["baseline"], report.report["final"]
        >>> before["sparsity"], round(after["sparsity"], 2), after["compact_bytes"] < before["compact_bytes"]
        (0.0, 0.77, True)
    """

    def __init__(
        self,
        example_input: Tensor | tuple[Tensor, ...] | Mapping[str, Tensor] | None = None,
        metrics: Sequence[str] = ("val/acc",),
        *,
        input_shape: Sequence[int] | None = None,
        latency: bool = True,
        repeats: int = 30,
        plots: bool = True,
        dirpath: str | None = None,
        filename: str = "compression_report.json",
    ) -> None:
        if input_shape is not None:
            if isinstance(input_shape, (str, bytes)) or not isinstance(input_shape, Sequence) or not input_shape or \
                    not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in input_shape):
                fail("input_shape", "a batch shape of positive ints such as [256, 784], or None", input_shape,
                     exc=TypeError)
            if example_input is not None:
                fail("input_shape", "None when `example_input` is given", list(input_shape),
                     hint="pass one of the two")
            example_input = torch.zeros(*input_shape)
        if example_input is not None:
            batch_call(example_input)  # a tensor, a tuple of them or a mapping of them, each with a batch dimension
        if isinstance(metrics, str) or not all(isinstance(m, str) for m in metrics):
            fail("metrics", "a list of logged metric names such as ['val/acc']", metrics, exc=TypeError)
        for name, value in (("latency", latency), ("plots", plots)):
            if not isinstance(value, bool):
                fail(name, "a bool", value, exc=TypeError)
        check_int("repeats", repeats, minimum=1)
        if dirpath is not None and not isinstance(dirpath, (str, Path)):
            fail("dirpath", "a directory path or None", dirpath, exc=TypeError)
        if not isinstance(filename, str) or not filename.endswith(".json"):
            fail("filename", "a file name ending in .json", filename)
        self.example_input, self.metrics = example_input, list(metrics)
        self.latency, self.repeats, self.plots = latency, repeats, plots
        self.dirpath, self.filename = dirpath, filename
        self.baseline: dict[str, Any] | None = None  # the baseline summary, as a dict (saved in checkpoints)
        self.baseline_metrics: dict[str, float] = {}
        self.baseline_note = ""
        self.report: dict[str, Any] | None = None  # the last report written
        self._off = False  # an extra it needs is missing: no report, the fit goes on
        self._batch: Any = None  # the inputs measured, once resolved
        self._warned_onnx = False
        self._sharded = False  # the compressed model holds FSDP2 shards: gathered to rank zero for the report

    def _input(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> Any:
        if self._batch is None:
            x: Any = self.example_input if self.example_input is not None else pl_module.example_input_array
            self._batch = first_batch_inputs(trainer, pl_module, "CompressionReport") if x is None else x
        try:
            batch_call(self._batch)
        except TypeError as err:
            raise TypeError(f"{err} HINT: pass CompressionReport(example_input=batch) or set "
                            "`self.example_input_array` in your LightningModule") from None
        return move_data_to_device(self._batch, pl_module.device)

    @staticmethod
    def _baseline_model(pl_module: pl.LightningModule) -> tuple[nn.Module, str]:
        teacher = getattr(pl_module, "teacher", None)
        if isinstance(teacher, nn.Module) and _compression_target(pl_module) is not pl_module:
            return teacher, "teacher"
        return _compression_target(pl_module), "before"

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        x = self._input(trainer, pl_module)  # raises before any training step when there is no usable input
        absent = missing("safetensors")
        if absent:  # the report is optional: the fit goes on without it
            self._off = True
            rank_zero_warn(f"CompressionReport: no report for this fit: it measures real file sizes with "
                           f"safetensors, which is not installed. Install it with: {install_hint(absent)}")
            return
        target = _compression_target(pl_module)
        self._sharded = is_sharded_model(target)
        if self.baseline is not None:  # restored from a checkpoint: the original model's figures
            return
        model, _ = self._baseline_model(pl_module)
        whole = gather_model(model)  # FSDP2 shards: a whole copy on rank zero (every process takes part)
        if whole is None:
            return  # rank zero reports
        self.baseline = summarize(whole, x, latency=self.latency and trainer.is_global_zero,
                                  onnx=self._onnx(target), repeats=self.repeats).to_dict()

    def _onnx(self, target: nn.Module) -> bool:
        """Whether ONNX Runtime latencies are measured: for quantized models, when ONNX Runtime is installed."""
        if not (self.latency and quantized_layers(target)):
            return False
        absent = missing(*ONNX_RUNTIME)
        if absent and not self._warned_onnx:
            self._warned_onnx = True
            rank_zero_warn(f"CompressionReport: no ONNX Runtime latency ({', '.join(absent)} not installed). "
                           f"Install it with: {install_hint(absent)}")
        return not absent

    @override
    def on_sanity_check_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.baseline_metrics or trainer.global_step > 0:
            return
        self.baseline_metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k in self.metrics}
        full = trainer.num_val_batches
        done = trainer.num_sanity_val_batches
        if any(d < f for d, f in zip(done, full)):
            self.baseline_note = (f"baseline metrics from {sum(done)} of {sum(full)} validation batches "
                                  "(set Trainer(num_sanity_val_steps=-1) for all)")

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # after the last validation, before Lightning finalizes the loggers
        if self._off or (self.baseline is None and not self._sharded):
            return
        # `trainer.log_dir` broadcasts from rank zero under DDP: every rank must ask for it
        directory = Path(self.dirpath) if self.dirpath else Path(trainer.log_dir or trainer.default_root_dir)
        final = gather_model(_compression_target(pl_module))  # FSDP2 shards: collective, rank zero gets the copy
        if not trainer.is_global_zero or final is None or self.baseline is None:
            return
        try:
            self.report = self._write(trainer, pl_module, final, directory, self.baseline)
        except Exception as err:  # a report must never crash a finished fit
            rank_zero_warn(f"CompressionReport could not be completed: {type(err).__name__}: {err}")

    def _write(self, trainer: pl.Trainer, pl_module: pl.LightningModule, target: nn.Module, directory: Path,
               baseline_dict: dict[str, Any]) -> dict[str, Any]:
        final = summarize(target, self._input(trainer, pl_module), latency=self.latency, repeats=self.repeats,
                          onnx=self._onnx(target))
        baseline = ModelSummary.from_dict(baseline_dict)
        _, label = self._baseline_model(pl_module)
        logged = {k: float(v) for k, v in trainer.callback_metrics.items() if isinstance(v, (Tensor, float, int))}
        missing = [k for k in self.metrics if k not in logged]
        if missing:
            rank_zero_warn(f"CompressionReport: metrics {missing} were never logged; logged keys are "
                           f"{sorted(logged)}. Name logged keys in `metrics`.")
        after = {k: logged.get(k) for k in self.metrics}
        before = ({k: logged.get(f"teacher/{k}") for k in self.metrics} if label == "teacher"
                  else {k: self.baseline_metrics.get(k) for k in self.metrics})
        rows = compare(baseline, final, before, after)
        title = f"Compression report ({type(pl_module).__name__}, batch {final.batch_size})"
        after_label = "student" if label == "teacher" else "after"
        rank_zero_info(format_table(rows, title, before=label, after=after_label))
        if self.baseline_note:
            rank_zero_info(f"Note: {self.baseline_note}")
        if final.deployed is not None and final.quantized:
            rank_zero_info(f"Note: the deployed ONNX file is {final.deployed}, the fastest in ONNX Runtime here")
        slower = _slower(baseline, final, label)
        if slower:
            rank_zero_info(f"Note: {slower}")
            rank_zero_warn(f"CompressionReport: {slower}")
        report = {"schema": _SCHEMA, "baseline_kind": label, "baseline": baseline_dict, "final": final.to_dict(),
                  "metrics": {"before": before, "after": after}, "rows": rows, "note": self.baseline_note,
                  "global_step": trainer.global_step}
        directory.mkdir(parents=True, exist_ok=True)
        (directory / self.filename).write_text(json.dumps(report, indent=1))
        _log_metrics(trainer, {f"compression/{k}": v for k, v in _headline(baseline, final).items()})
        if self.plots:
            self._plot(directory, baseline, final, (label, after_label), before, after)
        return report

    def _plot(self, directory: Path, baseline: ModelSummary, final: ModelSummary, labels: tuple[str, str],
              before: dict[str, float | None], after: dict[str, float | None]) -> None:
        from litcompress.report.plots import plot_layers, plot_tradeoff

        try:
            plot_layers(final, directory / "compression_layers.png")
            if self.metrics:
                key = self.metrics[0]
                start, end = before.get(key), after.get(key)
                if start is not None and end is not None:
                    plot_tradeoff([(labels[0], baseline.compact_bytes, start), (labels[1], final.compact_bytes, end)],
                                  directory / "compression_tradeoff.png", metric=key,
                                  title=f"{key} vs size on disk")
        except ImportError as err:
            rank_zero_warn(f"CompressionReport: no plots ({err}); pass plots=False to silence this.")

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"baseline": self.baseline, "baseline_metrics": self.baseline_metrics, "note": self.baseline_note}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.baseline = state_dict.get("baseline")
        self.baseline_metrics = dict(state_dict.get("baseline_metrics", {}))
        self.baseline_note = state_dict.get("note", "")


def _slower(before: ModelSummary, after: ModelSummary, label: str) -> str:
    """What to say when the compressed model would deploy slower than the baseline (else ``""``)."""
    speed = deployed_latencies(before, after)
    if speed is None:
        return ""
    where, a, b = speed
    change = speed_change(a, b)
    if not change.endswith("slower"):
        return ""
    text = (f"the compressed model runs {change} than the {label} model in {where} ({1e3 * b:.3f} ms vs "
            f"{1e3 * a:.3f} ms per batch of {after.batch_size}, on this machine)")
    if where == "torch eager" and after.quantized:
        return text + ("; torch eager runs fake quantization, not what ONNX Runtime deploys: install onnxruntime "
                       "for the deployed latency")
    if after.int8_choice is not None:
        return text + ("; that is already its export with int8 only where it pays (export_onnx(..., "
                       "int8='auto')), no slower than its fp32 export")
    return text


def _headline(before: ModelSummary, after: ModelSummary) -> dict[str, float]:
    out = {"sparsity": after.sparsity, "bits_per_weight": after.bits_per_weight,
           "compact_bytes": float(after.compact_bytes), "size_ratio": after.compact_bytes / before.compact_bytes,
           "flops_ratio": after.sparse_flops / before.sparse_flops if before.sparse_flops else math.nan}
    for kind in ("eager", "onnx"):
        a, b = getattr(before, f"latency_{kind}"), getattr(after, f"latency_{kind}")
        if a and b:
            out[f"latency_ratio_{kind}"] = b / a
    return {k: float(v) for k, v in out.items()}

