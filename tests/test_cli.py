"""`examples/cli.py`: each YAML config in `examples/configs/` runs through LightningCLI and does what it says."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from litcompress import CompressionReport, DistillationModule, Pruning, QuantizationAwareTraining

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "examples" / "configs").glob("*.yaml"))


@pytest.fixture(scope="module")
def cli_main():
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        from cli import main
        from mnist5k import TeacherCNN
    finally:
        sys.path.pop(0)
    return main, TeacherCNN


def test_every_config_is_tested():
    assert {c.stem for c in CONFIGS} == {"prune", "qat", "distill", "all"}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.stem)
def test_config_runs_a_few_steps(config, tmp_path, cli_main):
    main, teacher_cls = cli_main
    torch.save(teacher_cls().state_dict(), tmp_path / "teacher.pt")
    args = ["fit", "--config", str(config), f"--trainer.default_root_dir={tmp_path}",
            "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false",
            "--data.limit=256"]
    if "teacher" in config.read_text():
        args.append(f"--model.init_args.teacher.init_args.weights={tmp_path / 'teacher.pt'}")
    cli = main(args)
    callbacks = {type(c): c for c in cli.trainer.callbacks}
    report = callbacks[CompressionReport].report
    assert report is not None and (tmp_path / "compression_report.json").exists()
    final = report["final"]
    if Pruning in callbacks:
        target = callbacks[Pruning].sparsity if isinstance(callbacks[Pruning].sparsity, float) else None
        assert final["sparsity"] > 0.3 and (target is None or final["sparsity"] <= target)
    if QuantizationAwareTraining in callbacks:
        bits = {layer["name"]: layer["bits"] for layer in final["layers"]}
        first = "features.0.weight" if "features.0.weight" in bits else "model.features.0.weight"  # student, model
        assert final["quantized"] and bits.pop(first) == (32 if "<first>" in config.read_text() else 8)
        assert set(bits.values()) == {8}
    else:
        assert not final["quantized"]
    if isinstance(cli.model, DistillationModule):
        assert report["baseline_kind"] == "teacher"
        loaded = cli.model.teacher.state_dict()
        assert all(torch.equal(v, torch.load(tmp_path / "teacher.pt")[k]) for k, v in loaded.items())
    assert (tmp_path / "lightning_logs").exists() or any(tmp_path.glob("**/config.yaml"))


def test_print_config_lists_every_option(cli_main, capsys):
    main, _ = cli_main
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(ROOT / "examples" / "configs" / "all.yaml"), "--print_config"])
    out = capsys.readouterr().out
    for option in ("temperature: 4.0", "cache_top_k", "transfer", "class_path: litcompress.Pruning", "schedule: cubic",
                   "class_path: litcompress.QuantizationAwareTraining", "freeze_observers: 39",
                   "class_path: litcompress.CompressionReport"):
        assert option in out, option
