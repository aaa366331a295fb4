"""`summarize`: what a model costs (parameters, nonzeros, bits, bytes on disk, FLOPs, latency), measured.

Every number is measured, not estimated: sizes are the bytes of real files (:func:`~litcompress.export.save_compressed`
and a float32 safetensors file), FLOPs come from :class:`torch.utils.flop_counter.FlopCounterMode`, latency is the
median of timed forward passes (torch eager, and ONNX Runtime on the exported model when it is quantized: the file
you would deploy, with int8 only where it pays as :func:`~litcompress.export.choose_int8` measures it).

>>> import torch
>>> from torch import nn
>>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
>>> s = summarize(model, torch.randn(2, 8), latency=False)
>>> s.parameters, s.nonzero, s.bits_per_weight, s.flops  # FLOPs: 2 per multiply-add, batch of 2
(212, 212, 32.0, 768)
"""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from litcompress._calls import batch_call
from litcompress._compat import eager_calls
from litcompress._extras import ONNX_EXPORT, ONNX_RUNTIME, install_hint, missing, require
from litcompress._timing import median_seconds, ort_feed, ort_session
from litcompress._validation import check_int, fail
from litcompress.export import Int8Choice, choose_int8, export_onnx
from litcompress.quantization.access import quantized_weights
from litcompress.quantization.compact import save_compressed

__all__ = ["LayerSummary", "ModelSummary", "summarize"]


@dataclass
class LayerSummary:
    """One weight tensor (two or more dimensions): its size, its zeros and the bits it is stored with."""

    name: str
    parameters: int
    nonzero: int
    bits: int

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nonzero / self.parameters if self.parameters else 0.0


@dataclass
class ModelSummary:
    """The measured cost of one model. ``latency_*`` are median seconds per batch of ``batch_size``, or ``None``.

    ``latency_onnx`` is the ONNX file you would deploy: a float model's export, or for a quantized model the export
    with int8 only on the layers where it pays (``export_onnx(model, x, path, int8="auto")``), never slower than
    its fp32 export as measured. For a quantized model, ``latency_onnx_int8`` is the all-int8 export and
    ``latency_onnx_fp32`` the same model exported with fake quantization off (float weights and activations), and
    ``int8_choice`` holds the per-layer table (:meth:`~litcompress.export.Int8Choice.to_dict`).
    """

    parameters: int
    nonzero: int
    bits_per_weight: float
    compact_bytes: int
    fp32_bytes: int
    flops: int
    sparse_flops: int
    batch_size: int
    latency_eager: float | None = None
    latency_onnx: float | None = None
    latency_onnx_fp32: float | None = None
    quantized: bool = False
    layers: list[LayerSummary] = field(default_factory=list)
    latency_onnx_int8: float | None = None
    int8_choice: dict[str, Any] | None = None

    @property
    def deployed(self) -> str | None:
        """Which ONNX file ``latency_onnx`` timed, in words (``None`` when none was timed).

        >>> ModelSummary(10, 10, 32.0, 40, 40, 0, 0, 1, latency_onnx=1e-3).deployed
        'the fp32 export'
        """
        if self.latency_onnx is None:
            return None
        if self.int8_choice is None:
            return "the fp32 export"
        done, of = len(self.int8_choice["int8_layers"]), len(self.int8_choice["layers"])
        return f"int8 in {done} of {of} quantized layers (export_onnx(..., int8='auto'))"

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nonzero / self.parameters if self.parameters else 0.0

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSummary:
        """The inverse of :meth:`to_dict` (derived fields are dropped)."""
        fields = {k: v for k, v in data.items() if k not in ("sparsity", "layers")}
        layers = [LayerSummary(**{k: v for k, v in layer.items() if k != "sparsity"}) for layer in data["layers"]]
        return cls(**fields, layers=layers)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["sparsity"] = self.sparsity
        for layer, entry in zip(self.layers, out["layers"]):
            entry["sparsity"] = layer.sparsity
        return out


def summarize(
    model: nn.Module,
    example_input: Tensor | Mapping[str, Tensor],
    *,
    latency: bool = True,
    onnx: bool | None = None,
    repeats: int = 30,
    warmup: int = 5,
) -> ModelSummary:
    """Measure ``model`` on ``example_input`` (one batch; its first dimension is the batch size).

    Args:
        model: any module; a model trained with litcompress callbacks reports its masks' zeros and its
            quantized weights' bits.
        example_input: an input batch the model accepts: a tensor, or a mapping of tensors passed as keyword
            arguments (a Hugging Face model's ``input_ids``, ``attention_mask``, ...).
        latency: time forward passes (``False`` skips it: faster, and deterministic output).
        onnx: also time the model exported with :func:`~litcompress.export.export_onnx` in ONNX Runtime;
            ``None`` does so when the model has quantized layers in force. A quantized model is timed through
            :func:`~litcompress.export.choose_int8` (``repeats`` timed runs per file, its other arguments as
            default): the all-int8 and the fp32 exports, and the choice (int8 only where it pays), which is the
            ``latency_onnx`` reported. That costs ``L + 2`` exports for ``L`` quantized layers.
        repeats: timed forward passes (the median is reported).
        warmup: untimed passes first.

    Raises:
        TypeError: ``model`` is not a module or ``example_input`` not a tensor.
        ValueError: the model cannot run on ``example_input`` (the message carries the model's error).
    """
    if not isinstance(model, nn.Module):
        fail("model", "a torch.nn.Module", type(model).__name__, exc=TypeError)
    args, kwargs = batch_call(example_input)
    check_int("repeats", repeats, minimum=1)
    check_int("warmup", warmup, minimum=0)
    require("safetensors", what="summarize (it measures the sizes of real files)")
    quantized = quantized_weights(model)
    is_quantized = bool(quantized)
    with_onnx = latency and (is_quantized if onnx is None else onnx)
    if with_onnx and onnx is None and missing("onnxruntime", *ONNX_EXPORT):
        warnings.warn(f"summarize: no ONNX Runtime latency for this quantized model ({install_hint(ONNX_RUNTIME)} "
                      "adds it); pass onnx=False to silence this.", stacklevel=2)
        with_onnx = False
    elif with_onnx:
        require(*ONNX_RUNTIME, what="summarize(onnx=True)")
    weights = dict(model.named_parameters())  # tied weights once
    bits = {name: q.config.weight_bits for name, (q, _) in quantized.items()}
    layers = [LayerSummary(name, p.numel(), int(torch.count_nonzero(p)), bits.get(name, 8 * p.element_size()))
              for name, p in weights.items() if p.dim() >= 2]
    total = sum(p.numel() for p in weights.values())
    nonzero = sum(int(torch.count_nonzero(p)) for p in weights.values())
    bit_sum = sum(bits.get(name, 8 * p.element_size()) * p.numel() for name, p in weights.items())
    was_training = model.training
    model.eval()
    try:
        flops, sparse_flops = _flops(model, args, kwargs)
        with tempfile.TemporaryDirectory() as tmp:
            compact = save_compressed(model, Path(tmp) / "compact.safetensors").stat().st_size
            fp32 = _fp32_file_size(model, Path(tmp) / "fp32.safetensors")
            summary = ModelSummary(total, nonzero, bit_sum / total if total else 32.0, compact, fp32, flops,
                                   sparse_flops, len([*args, *kwargs.values()][0]), quantized=is_quantized,
                                   layers=layers)
            if latency:
                summary.latency_eager = median_seconds(lambda: model(*args, **kwargs), repeats, warmup)
            if with_onnx and is_quantized:
                choice = _int8_choice(model, example_input, repeats)
                if choice is not None and choice.exported_ms is not None:
                    summary.latency_onnx = choice.exported_ms / 1e3
                    summary.latency_onnx_int8 = None if choice.all_int8_ms is None else choice.all_int8_ms / 1e3
                    summary.latency_onnx_fp32 = None if choice.float_ms is None else choice.float_ms / 1e3
                    summary.int8_choice = choice.to_dict()
            elif with_onnx:
                summary.latency_onnx = _onnx_latency(model, example_input, Path(tmp) / "model.onnx", repeats,
                                                     warmup)
    finally:
        model.train(was_training)
    return summary


@torch.no_grad()
def _flops(model: nn.Module, args: tuple[Tensor, ...], kwargs: dict[str, Tensor]) -> tuple[int, int]:
    """Dense FLOPs of one forward pass, and the FLOPs left when each layer's zero weights are skipped."""
    counter = FlopCounterMode(display=False)
    saved = 0.0
    handles, starts = [], {}
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if not (isinstance(weight, Tensor) and weight.dim() >= 2 and not list(module.children())):
            continue
        density = float(torch.count_nonzero(weight)) / weight.numel()

        def pre(mod: nn.Module, args: Any) -> None:
            starts[id(mod)] = counter.get_total_flops()

        def post(mod: nn.Module, args: Any, out: Any, density: float = density) -> None:
            nonlocal saved
            saved += (counter.get_total_flops() - starts.pop(id(mod))) * (1.0 - density)

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    try:
        # a compiled model entered under the counter's mode would never compile again: count its plain forward
        with eager_calls(model), counter, warnings.catch_warnings():
            # the counter's own global module hooks make a `torch.compile(module)` wrapper warn: not the user's hooks
            warnings.filterwarnings("ignore", message=r"Using `torch\.compile\(module\)` when there are global hooks",
                                    category=UserWarning)
            model(*args, **kwargs)
    except Exception as err:
        given = (f"a tensor of shape {tuple(args[0].shape)} and dtype {args[0].dtype}" if args else
                 "tensors " + ", ".join(f"{k} of shape {tuple(v.shape)}" for k, v in kwargs.items()))
        fail("example_input", "an input the model accepts", given, hint=f"the forward pass failed with: {err}")
    finally:
        for handle in handles:
            handle.remove()
    total = counter.get_total_flops()
    return total, round(total - saved)


def _fp32_file_size(model: nn.Module, path: Path) -> int:
    from safetensors.torch import save_file

    tensors, seen = {}, set()
    for name, value in model.state_dict(keep_vars=True).items():
        if id(value) in seen:  # tied weights are stored once
            continue
        seen.add(id(value))
        value = value.detach().cpu()
        tensors[name] = (value.float() if value.is_floating_point() else value).contiguous()
    save_file(tensors, str(path))
    return path.stat().st_size


def _int8_choice(model: nn.Module, example_input: Tensor | Mapping[str, Tensor], repeats: int) -> Int8Choice | None:
    """What :func:`~litcompress.export.choose_int8` measures; ``None``, with a warning saying why, when the model
    does not export or ONNX Runtime cannot run it."""
    try:
        return choose_int8(model, example_input, repeats=repeats)
    except Exception as err:  # the report says why and goes on without these figures
        warnings.warn(f"summarize: no ONNX Runtime latency for {type(model).__name__}: {type(err).__name__}: "
                      f"{str(err).splitlines()[0][:300]}", stacklevel=3)
        return None


def _onnx_latency(model: nn.Module, example_input: Tensor | Mapping[str, Tensor], path: Path, repeats: int,
                  warmup: int) -> float | None:
    """Median ONNX Runtime latency of the fp32 export of a model without quantized layers in force; ``None``, with
    a warning saying why, when the model does not export (some models use operations the exporter cannot trace) or
    ONNX Runtime cannot run it. The session does not spin, as in :func:`~litcompress.export.choose_int8`, so the
    figures of a float and a quantized model compare."""
    try:
        export_onnx(model, example_input, path, int8="none")
        session = ort_session(path, torch.get_num_threads(), spinning=False)
        feed = ort_feed(session, *batch_call(example_input))
        session.run(None, feed)
    except Exception as err:  # the report says why and goes on without this figure
        warnings.warn(f"summarize: no ONNX Runtime latency for {type(model).__name__}: {type(err).__name__}: "
                      f"{str(err).splitlines()[0][:300]}", stacklevel=3)
        return None
    return median_seconds(lambda: session.run(None, feed), repeats, warmup)
