"""Distil a byte-level GPT-2 into a smaller student that is pruned and quantized in the same `Trainer.fit`.

Real text that every machine has on disk: the Python standard library's own `.py` files, read at run time and split
by file into training and held-out text (every 8th file is held out). Four models, trained on the same bytes:

1. the teacher, a Hugging Face `GPT2LMHeadModel` (byte vocabulary, 4 layers, width 128);
2. the student (2 layers, width 64: 6.9x fewer parameters) trained from scratch on the labels;
3. the same student from scratch with the same `Pruning` and `QuantizationAwareTraining` as 4 (not with
   `--no-compress`), so that distillation is compared at equal budget and equal compression;
4. the same student distilled from the teacher (token-level KD) while `Pruning` and `QuantizationAwareTraining`
   compress it, in ONE fit with the same number of steps as 2 and 3, with `CompressionReport` at the end.

It prints the held-out perplexity (per byte) of each and the share of the scratch-to-teacher gap that distillation
closes. The measured figures, wall times and what else was tried are in `benchmarks/RESULTS.md` ("Distilling a
byte-level GPT-2 on real text").

    python examples/distill_gpt2.py              # several minutes on 2 CPU cores (see RESULTS.md)
    python examples/distill_gpt2.py --quick      # a smoke test (CI): it runs end to end; its numbers mean nothing
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sysconfig
import time
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.warnings import PossibleUserWarning
from mnist5k import progress, quiet_lightning
from torch.utils.data import DataLoader, Dataset

from litcompress import CompressionReport, DistillationModule, Pruning, QuantizationAwareTraining
from litcompress.distillation import TeacherCache


def stdlib_bytes(held_out_every: int = 8) -> tuple[bytes, bytes]:
    """The standard library's top-level ``.py`` files as bytes: (training text, held-out text), split by file."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    train = [f.read_bytes() for i, f in enumerate(files) if i % held_out_every]
    held = [f.read_bytes() for i, f in enumerate(files) if not i % held_out_every]
    return b"\n".join(train), b"\n".join(held)


class Chunks(Dataset):
    """Consecutive windows of ``context`` bytes as ``{"input_ids", "labels"}`` (the model shifts the labels)."""

    def __init__(self, text: bytes, context: int, limit: int | None = None) -> None:
        data = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
        n = len(data) // context if limit is None else min(limit, len(data) // context)
        self.windows = data[: n * context].view(n, context)

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.windows[i], "labels": self.windows[i]}


def gpt2(width: int, layers: int, heads: int, context: int) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=256, n_positions=context, n_embd=width, n_layer=layers, n_head=heads,
                        bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2LMHeadModel(config)
    # transformers picks a model's loss from its class name, and "GPT2LMHeadModel" names none: without this it logs
    # "`loss_type=None` was set in the config but it is unrecognized" and falls back to this very loss.
    model.loss_type = "ForCausalLM"
    return model


class CausalLM(pl.LightningModule):
    """Plain language-model training of a Hugging Face causal LM on dict batches (its own shifted loss)."""

    def __init__(self, model: torch.nn.Module, lr: float) -> None:
        super().__init__()
        self.model, self.lr = model, lr

    def forward(self, **inputs: Any) -> Any:
        return self.model(**inputs)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.model(**batch).loss
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        return cosine_adamw(self, self.lr)


def cosine_adamw(module: pl.LightningModule, lr: float) -> Any:
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)
    steps = int(module.trainer.estimated_stepping_batches)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.05)
    return [optimizer], [{"scheduler": schedule, "interval": "step"}]


class Distilled(DistillationModule):
    """Token-level KD with the same optimizer and schedule as the scratch student."""

    def configure_optimizers(self) -> Any:
        return cosine_adamw(self, self.lr)


@torch.no_grad()
def perplexity(model: torch.nn.Module, data: Dataset, batch_size: int = 64) -> float:
    """exp of the mean held-out cross entropy per predicted byte (the model's own shifted loss)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in DataLoader(data, batch_size=batch_size):
        tokens = batch["labels"][:, 1:].numel()
        total += float(model(**batch).loss) * tokens
        count += tokens
    model.train(was_training)
    return math.exp(total / count)


def fit(module: pl.LightningModule, name: str, data: Dataset, epochs: int, batch_size: int, callbacks=(),
        out: Path | None = None) -> float:
    bar, lines = progress(name)
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_model_summary=False, enable_progress_bar=bar, callbacks=[*callbacks, *lines],
                         default_root_dir=out, num_sanity_val_steps=0)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        # Lightning's advice for `DistillationModule.validation_step` without a `val_dataloader`: no validation during
        # the fits is deliberate here, every model's held-out perplexity is measured after its fit by `perplexity`
        warnings.filterwarnings("ignore", message=r".*`validation_step` but have no `val_dataloader`",
                                category=PossibleUserWarning)
        trainer.fit(module, DataLoader(data, batch_size=batch_size, shuffle=True))
    return time.perf_counter() - t0


SMOKE = ("SMOKE TEST (--quick): far too few steps (256 windows, 1-2 epochs) for the numbers to mean anything; it\n"
         "only checks that the example runs end to end. Real figures: run without --quick (benchmarks/RESULTS.md).")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--train-windows", type=int, default=12_000, help="training windows of `context` bytes")
    parser.add_argument("--teacher-epochs", type=int, default=3)
    parser.add_argument("--teacher-windows", type=int, default=None,
                        help="training windows of the teacher (default: --train-windows; the students always train on "
                             "--train-windows): a teacher trained on more of the text, as pretrained teachers are")
    parser.add_argument("--epochs", type=int, default=3, help="student epochs (scratch and distilled alike)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--sparsity", type=float, default=0.3)
    parser.add_argument("--prune-start", type=int, default=0, help="epoch where pruning starts")
    parser.add_argument("--prune-end", type=int, default=None, help="epoch where pruning reaches --sparsity "
                        "(default: --qat-start)")
    parser.add_argument("--qat-start", type=int, default=None, help="epoch where fake quantization starts "
                        "(default: the last epoch)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--alpha", type=float, default=0.9)
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate of every student (one-cycle)")
    parser.add_argument("--no-cache-teacher", dest="cache_teacher", action="store_false",
                        help="run the teacher on every batch instead of caching its logits after the first epoch")
    parser.add_argument("--no-compress", action="store_true",
                        help="distil only (no Pruning, no QAT): how much of the result is distillation's own")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reuse-teacher", action="store_true",
                        help="load the teacher saved by an earlier run with the same data, seed and teacher epochs")
    parser.add_argument("--out", type=Path, default=Path("distill_gpt2_out"))
    parser.add_argument("--quick", action="store_true", help="a smoke test (tiny data, 1 teacher epoch, 2 student "
                        "epochs): it checks that the example runs end to end; the numbers it prints mean nothing")
    args = parser.parse_args(argv)
    if args.quick:
        args.train_windows, args.teacher_epochs, args.epochs = 256, 1, 2
        print(SMOKE, flush=True)
    quiet_lightning()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    args.out.mkdir(parents=True, exist_ok=True)
    train_text, held_text = stdlib_bytes()
    train = Chunks(train_text, args.context, args.train_windows)
    teacher_windows = args.train_windows if args.teacher_windows is None or args.quick else args.teacher_windows
    teacher_train = train if teacher_windows == args.train_windows else Chunks(train_text, args.context,
                                                                               teacher_windows)
    held = Chunks(held_text, args.context, 2_000 if not args.quick else 128)
    t0 = time.perf_counter()

    pl.seed_everything(args.seed, verbose=False)
    teacher = gpt2(128, 4, 4, args.context)
    saved = args.out / (f"teacher_s{args.seed}_e{args.teacher_epochs}_w{teacher_windows}_c{args.context}"
                        f"_b{args.batch_size}.pt")
    if args.reuse_teacher and saved.exists():
        teacher.load_state_dict(torch.load(saved, weights_only=True))
        seconds = {"teacher": 0.0}
    else:
        seconds = {"teacher": fit(CausalLM(teacher, 3e-3), "teacher", teacher_train, args.teacher_epochs,
                                  args.batch_size)}
        torch.save(teacher.state_dict(), saved)
    teacher.eval()

    pl.seed_everything(args.seed, verbose=False)
    student = gpt2(64, 2, 2, args.context)
    initial = copy.deepcopy(student.state_dict())  # the same initial weights for every student
    qat_start = args.qat_start if args.qat_start is not None else max(1, args.epochs - 1)
    prune_end = args.prune_end if args.prune_end is not None else qat_start

    def compression() -> list[pl.Callback]:
        return [] if args.no_compress else [
            Pruning(args.sparsity, start=args.prune_start, end=prune_end, verbose=False),
            QuantizationAwareTraining(start=qat_start, verbose=False)]

    students = {"scratch": copy.deepcopy(student)}
    seconds["scratch"] = fit(CausalLM(students["scratch"], args.lr), "scratch student", train, args.epochs,
                             args.batch_size)
    if not args.no_compress:
        students["scratch_compressed"] = copy.deepcopy(student)
        pl.seed_everything(args.seed, verbose=False)
        seconds["scratch_compressed"] = fit(CausalLM(students["scratch_compressed"], args.lr),
                                            "scratch student + compression", train, args.epochs, args.batch_size,
                                            compression())

    pl.seed_everything(args.seed, verbose=False)
    student.load_state_dict(initial)
    students["distilled"] = student
    # the teacher's logits are computed in the first epoch and reused after it (float32: the targets are exact)
    module = Distilled(student, teacher, temperature=args.temperature, alpha=args.alpha, lr=args.lr,
                       cache=TeacherCache(max_bytes=2 << 30) if args.cache_teacher else False)
    report = CompressionReport(metrics=[], dirpath=str(args.out), plots=False)
    seconds["distilled"] = fit(module, "distilled student", train, args.epochs, args.batch_size,
                               [*compression(), report], args.out)

    ppl = {"teacher": perplexity(teacher, held), **{name: perplexity(m, held) for name, m in students.items()}}
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in (("teacher", teacher),
                                                                         ("student", student))}
    baseline = ppl.get("scratch_compressed", ppl["scratch"])  # the same student, compressed the same way
    gap = baseline - ppl["teacher"]
    closed = (baseline - ppl["distilled"]) / gap if gap > 0 else float("nan")
    plain_gap = ppl["scratch"] - ppl["teacher"]
    closed_plain = (ppl["scratch"] - ppl["distilled"]) / plain_gap if plain_gap > 0 else float("nan")
    result = {"perplexity": ppl, "parameters": params, "gap_closed": closed,
              "gap_closed_vs_uncompressed_scratch": closed_plain, "seconds": seconds,
              "student_sparsity": report.report["final"]["sparsity"] if report.report else None,
              "total_seconds": time.perf_counter() - t0, "args": {k: str(v) for k, v in vars(args).items()}}
    (args.out / "distill_gpt2.json").write_text(json.dumps(result, indent=1))
    print(f"\nByte-level GPT-2 on the Python standard library ({len(train):,} training windows of {args.context} "
          f"bytes; held-out files: {len(held):,} windows)")
    if args.quick:
        print(SMOKE)
    print(f"{'':44s} {'parameters':>11s} {'held-out perplexity':>20s}")
    print(f"{'teacher (4 layers, width 128)':44s} {params['teacher']:11,d} {ppl['teacher']:20.3f}")
    print(f"{'student from scratch (2 layers, width 64)':44s} {params['student']:11,d} {ppl['scratch']:20.3f}")
    if "scratch_compressed" in ppl:
        print(f"{'student from scratch + pruned + W8A8':44s} {params['student']:11,d} "
              f"{ppl['scratch_compressed']:20.3f}")
    label = "student distilled (no compression)" if args.no_compress else "student distilled + pruned + W8A8, one fit"
    print(f"{label:44s} {params['student']:11,d} {ppl['distilled']:20.3f}")
    print(f"share of the scratch-to-teacher gap closed by distillation (equal budget and compression): {closed:.0%} "
          f"({params['teacher'] / params['student']:.1f}x fewer parameters; {result['total_seconds']:.0f} s)")
    if "scratch_compressed" in ppl:
        print(f"against the uncompressed scratch student: {closed_plain:.0%} of its gap closed")
    if args.quick:
        print("(--quick smoke test: the numbers above are meaningless)")
    return result


if __name__ == "__main__":
    main()
