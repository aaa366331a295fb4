"""The same small fits run sharded (FSDP2 through `ModelParallelStrategy`, 2 gloo processes, in `fits.py`) and in
one process (the reference, in the tests): each process of the sharded fit sees every other sample, so a step's
averaged gradient is the one-process gradient of the same 16 samples."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader

from litcompress import (
    ChannelPruning,
    DistillationModule,
    LowRankFactorization,
    Pruning,
    QuantizationAwareTraining,
)
from tests.models import LitClassifier, TransformerClassifier, classification_data
from tests.test_hf_models import LitHF, gpt2
from tests.test_hf_models import data as hf_data

STEPS = 16  # 2 epochs of 8 optimizer steps
PER_STEP = 16  # samples per optimizer step, over all processes


def mlp() -> nn.Module:
    """Odd widths: 27 rows shard 14 + 13; inputs of the first two layers divide by 4 (N:M)."""
    return nn.Sequential(nn.Linear(16, 36), nn.ReLU(), nn.Linear(36, 27), nn.ReLU(), nn.Linear(27, 4))


def shard_(model: nn.Module, mesh: Any) -> None:
    """FSDP2 as users apply it: every layer holding parameters, then the whole model. An attention layer's output
    projection stays in the attention's unit (nn.MultiheadAttention reads its weight without calling it)."""
    from torch.distributed.fsdp import fully_shard

    inside = {id(m) for a in model.modules() if isinstance(a, nn.MultiheadAttention) for m in a.modules() if m is not a}
    for module in list(model.modules())[1:]:
        if id(module) not in inside and next(module.parameters(recurse=False), None) is not None:
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)


def sharded(module: pl.LightningModule) -> bool:
    from lightning.pytorch.strategies import ModelParallelStrategy

    return isinstance(module.trainer.strategy, ModelParallelStrategy)


class Classifier(LitClassifier):
    shape: tuple[int, ...] = (16,)

    def dataset(self) -> Any:
        return classification_data(self.shape, n=STEPS // 2 * PER_STEP)

    def configure_model(self) -> None:
        if sharded(self):
            shard_(self.model, self.device_mesh["data_parallel"])


class SequenceClassifier(Classifier):
    """nn.MultiheadAttention blocks (tests.models.TransformerClassifier) on (6, 8) sequences."""

    shape = (6, 8)


class CausalLM(LitHF):
    """A tiny Hugging Face GPT-2 (Conv1D projections, LM head tied to the token embedding): each block is one FSDP
    unit, the embeddings and the tied head belong to the root unit."""

    def dataset(self) -> Any:
        return hf_data("gpt2", n=STEPS // 2 * PER_STEP)

    def configure_model(self) -> None:
        if sharded(self):
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            for block in self.model.transformer.h:
                fully_shard(block, mesh=mesh)
            fully_shard(self.model, mesh=mesh)


class Distiller(DistillationModule):
    def __init__(self, *args: Any, shard_teacher: bool = False, shard_adapters: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.shard_teacher, self.shard_adapters = shard_teacher, shard_adapters

    def configure_model(self) -> None:
        if sharded(self):
            mesh = self.device_mesh["data_parallel"]
            shard_(self.student, mesh)
            for adapter in self.adapters.values() if self.shard_adapters else ():  # FSDP2 syncs what it shards
                shard_(adapter, mesh)
            if self.shard_teacher:
                shard_(self.teacher, mesh)


def teacher() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 4)).eval()


def loader(trainer: pl.Trainer, module: Any = None) -> DataLoader:
    """Process ``r`` of ``n`` takes samples ``r, r + n, ...`` in order (no shuffling, unlike Lightning's sampler)."""
    data = module.dataset() if hasattr(module, "dataset") else classification_data((16,), n=STEPS // 2 * PER_STEP)
    n, rank = trainer.world_size, trainer.global_rank
    return DataLoader(data, batch_size=PER_STEP // n, sampler=range(rank, len(data), n))


def pruning_global() -> Pruning:
    return Pruning(0.7, interval="step", start=1, end=10, frequency=2, verbose=False)


def qat() -> QuantizationAwareTraining:
    return QuantizationAwareTraining(weight_bits=4, interval="step", start=2, freeze_observers=9, verbose=False)


CASES: dict[str, Any] = {
    "plain": (lambda: Classifier(mlp()), lambda: []),
    # name: (module factory, callbacks factory)
    "global": (lambda: Classifier(mlp()), lambda: [pruning_global()]),
    "layer_random": (lambda: Classifier(mlp()),
                     lambda: [Pruning(0.5, scope="layer", importance="random", interval="step", start=3,
                                      verbose=False)]),
    "nm": (lambda: Classifier(mlp()),
           lambda: [Pruning(pattern="2:4", exclude=["<last>"], interval="step", start=2, end=8, verbose=False)]),
    "movement": (lambda: Classifier(mlp(), optimizer="adam", lr=1e-2),
                 lambda: [Pruning(0.6, importance="movement", interval="step", start=3, end=9, frequency=3,
                                  verbose=False)]),
    "qat": (lambda: Classifier(mlp()), lambda: [qat()]),
    "qat_learned": (lambda: Classifier(mlp()),
                    lambda: [QuantizationAwareTraining(scale="learned", interval="step", start=2, verbose=False)]),
    "lowrank": (lambda: Classifier(mlp()), lambda: [LowRankFactorization(rank_ratio=0.5, exclude=["<last>"],
                                                                         verbose=False)]),
    "distill_replicated": (lambda: Distiller(mlp(), teacher(), temperature=2.0, alpha=0.5, lr=0.05), lambda: []),
    "distill_sharded": (lambda: Distiller(mlp(), teacher(), temperature=2.0, alpha=0.5, lr=0.05,
                                          shard_teacher=True), lambda: []),
    "transformer": (lambda: SequenceClassifier(TransformerClassifier()),
                    lambda: [Pruning(0.5, scope="layer", interval="step", start=2, end=8, verbose=False),
                             QuantizationAwareTraining(activation_bits=None, interval="step", start=1,
                                                       verbose=False)]),
    "gpt2": (lambda: CausalLM(gpt2(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),  # no dropout: same draws
             lambda: [Pruning(0.5, interval="step", start=2, end=8, verbose=False),
                      QuantizationAwareTraining(weight_bits=4, activation_bits=None, interval="step", start=1,
                                                verbose=False)]),
    "gpt2_nm": (lambda: CausalLM(gpt2(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),  # groups along dim 0
                lambda: [Pruning(pattern="2:4", parameters=r"\.h\.", interval="step", start=2, end=8,
                                 verbose=False)]),
    "distill_features": (lambda: Distiller(mlp(), teacher(), temperature=2.0, alpha=0.5, lr=0.05,
                                           features={"student.2": "teacher.0"}), lambda: []),
    "all": (lambda: Distiller(mlp(), teacher(), temperature=2.0, alpha=0.5, lr=0.05),
            lambda: [LowRankFactorization(rank_ratio=0.5, exclude=["<last>"], verbose=False), pruning_global(),
                     qat()]),
}


def make(case: str) -> tuple[pl.LightningModule, list[pl.Callback]]:
    module_fn, callbacks_fn = CASES[case]
    torch.manual_seed(0)
    return module_fn(), callbacks_fn()


def full_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights (gathered from the shards: every process calls it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from litcompress._shards import is_dtensor

    if any(is_dtensor(p) for p in module.parameters()):
        return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def _whole(value: Any) -> Any:
    from litcompress._shards import is_dtensor

    if isinstance(value, dict):
        return {k: _whole(v) for k, v in value.items()}
    return value.full_tensor().cpu() if is_dtensor(value) else value


def collect(module: pl.LightningModule, callbacks: list[pl.Callback]) -> dict[str, Any]:
    out: dict[str, Any] = {"weights": full_state(module), "pruning": [], "qat": []}
    for cb in callbacks:
        if isinstance(cb, Pruning) and cb.pruner is not None:
            out["pruning"].append({"masks": _whole(cb.pruner.state_dict()["masks"]),
                                   "sparsity": cb.pruner.sparsity(),
                                   "local": {k: tuple(v.shape) for k, v in cb.pruner.masks.items()}})
        if isinstance(cb, QuantizationAwareTraining):
            state = _whole(cb.state_dict())
            out["qat"].append(state)
            out["qat_ranks_agree"] = _same_on_every_process(state)
    return out


def _same_on_every_process(state: dict) -> bool:
    """Whether every process holds the same quantizer state (ranges, scales)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return True
    mine = [t for t in _leaves(state) if isinstance(t, torch.Tensor)]
    every: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    return all(len(o) == len(mine) and all(torch.equal(a, b) for a, b in zip(o, mine)) for o in every)


def _leaves(value: Any) -> list[Any]:
    return [x for v in value.values() for x in _leaves(v)] if isinstance(value, dict) else [value]


def trainer(processes: int, root: Any, strategy: str = "fsdp", **overrides: Any) -> pl.Trainer:
    from lightning.pytorch.strategies import ModelParallelStrategy

    kwargs: dict[str, Any] = dict(
        accelerator="cpu", devices=processes, max_steps=STEPS, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=root,
        use_distributed_sampler=False)
    if processes > 1 and strategy.startswith("fsdp"):  # "fsdp_full": checkpoints gathered into one file
        kwargs["strategy"] = ModelParallelStrategy(data_parallel_size=processes, tensor_parallel_size=1,
                                                   save_distributed_checkpoint=strategy != "fsdp_full")
    elif processes > 1:
        kwargs["strategy"] = strategy
    kwargs.update(overrides)
    return pl.Trainer(**kwargs)


def run_case(case: str, processes: int, root: Any, strategy: str = "fsdp") -> dict[str, Any]:
    module, callbacks = make(case)
    fit = trainer(processes, root, strategy, callbacks=callbacks)
    fit.fit(module, loader(fit, module))
    return collect(module, callbacks)


def run_resume(processes: int, root: Any, strategy: str = "fsdp") -> dict[str, Any]:
    """Pruning + QAT: uninterrupted, and resumed from the checkpoint written at the end of epoch 1 (step 8)."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def callbacks() -> list[pl.Callback]:
        return [pruning_global(), qat()]

    torch.manual_seed(0)
    module, cbs = Classifier(mlp()), callbacks()
    saver = ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=8, save_top_k=-1, filename="{step}")
    fit = trainer(processes, root, strategy, callbacks=[*cbs, saver], enable_checkpointing=True)
    fit.fit(module, loader(fit))
    whole = collect(module, cbs)
    torch.manual_seed(123)  # a different initialisation: everything must come from the checkpoint
    module, cbs = Classifier(mlp()), callbacks()
    fit = trainer(processes, root, strategy, callbacks=cbs)
    fit.fit(module, loader(fit), ckpt_path=str(root / "ckpt" / "step=8.ckpt"))
    return {"whole": whole, "resumed": collect(module, cbs)}


def run_export(processes: int, root: Any) -> dict[str, Any]:
    """Pruning + weight-only QAT + CompressionReport, then `export_onnx` and `save_compressed` called on every
    process: rank zero gathers and writes; the files are run / loaded in this process (rank zero) only."""
    import json

    from litcompress import CompressionReport
    from litcompress._timing import ort_feed, ort_session
    from litcompress.export import export_onnx, load_compressed, save_compressed

    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(7))
    torch.manual_seed(0)
    module = Classifier(mlp())
    cbs = [pruning_global(), QuantizationAwareTraining(weight_bits=4, activation_bits=None, interval="step", start=2,
                                                         verbose=False),
           CompressionReport(x, latency=False, plots=False, dirpath=str(root / "report"))]
    fit = trainer(processes, root, callbacks=cbs)
    fit.fit(module, loader(fit))
    module.eval()
    with torch.no_grad():
        y = module(x)  # sharded: every process takes part
    onnx = export_onnx(module.model, x, root / "model.onnx")
    compact = save_compressed(module.model, root / "model.safetensors")
    out: dict[str, Any] = {"y": y, "written": onnx.exists() and compact.exists(), "rank": fit.global_rank}
    if fit.global_rank == 0:
        session = ort_session(onnx, threads=1)
        out["y_onnx"] = torch.from_numpy(session.run(None, ort_feed(session, (x,), {}))[0])
        out["compact"] = {k: v.clone() for k, v in load_compressed(mlp(), compact).state_dict().items()}
        report = json.loads((root / "report" / "compression_report.json").read_text())
        final = report["final"]
        out["report"] = {"nonzero": final["nonzero"], "bits": final["bits_per_weight"],
                         "compact_bytes": final["compact_bytes"], "quantized": final["quantized"],
                         "baseline_nonzero": report["baseline"]["nonzero"]}
    return out


def run_unsynced(processes: int, root: Any) -> dict[str, Any]:
    """Feature adapters left out of fully_shard would train apart on each process: refused before the first step."""
    module = Distiller(mlp(), teacher(), temperature=2.0, alpha=0.5, features={"student.2": "teacher.0"},
                       shard_adapters=False)
    fit = trainer(processes, root, callbacks=[pruning_global()])
    try:
        fit.fit(module, loader(fit))
    except ValueError as err:
        return {"error": str(err), "steps": fit.global_step}
    return {"error": None, "steps": fit.global_step}


def run_channel(processes: int, root: Any, dead: bool = False, importance: str = "magnitude",
                gpt: bool = False, quantized: bool = False) -> dict[str, Any]:
    """Channel pruning (``dead``: unstructured pruning whose all-zero channels are removed): traced in `setup` on
    the whole model, masks on shards; at the end rank zero gets the smaller model (the sharded one keeps its size,
    masked). One process: the model itself ends smaller. ``gpt``: GPT-2's heads (packed in c_attn) and MLP neurons.
    ``quantized``: with quantization-aware training whose per-channel weight scales are frozen before the removal (the
    smaller copy shrinks its own scales; the sharded model keeps its)."""
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(7))
    torch.manual_seed(0)
    module = Classifier(mlp())
    if gpt:
        x = hf_data("gpt2", n=4).tensors[0]
        module = CausalLM(gpt2(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
        pruning = ChannelPruning(0.5, interval="step", start=2, end=8, frequency=2, example_input=x,
                          verbose=False)
    elif dead:  # 95% of the first layer's weights: at least 8 of its 36 rows end all zero
        pruning = Pruning({r"^model\.0": 0.95}, remove_channels=True, interval="step", start=2, end=8,
                          example_input=x, verbose=False)
    else:
        pruning = ChannelPruning(0.5, importance=importance, interval="step", start=2, end=8, frequency=2,
                          example_input=x, verbose=False)
    extra = [QuantizationAwareTraining(interval="step", freeze_observers=4, verbose=False)] if quantized else []
    fit = trainer(processes, root, callbacks=[*extra, pruning])
    fit.fit(module, loader(fit, module))
    module.eval()
    with torch.no_grad():
        y = module(x)  # sharded: every process takes part
    smaller = pruning.smaller_model if processes > 1 else module
    out: dict[str, Any] = {"y": y, "removed": pruning.removed, "rank": fit.global_rank,
                           "full_size": full_state(module)}
    if smaller is not None:
        with torch.no_grad():
            out["y_smaller"] = smaller.eval()(x)
        out["smaller"] = {k: v.detach().clone() for k, v in smaller.state_dict().items()}
    return out
