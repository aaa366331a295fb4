"""The examples and benchmark scripts run end to end (the README's and the docs' Python blocks: tests/test_docs.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_prune_mnist_example_reduced():
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import prune_mnist
    finally:
        sys.path.pop(0)
    result = prune_mnist.main(["--quiet"])  # the full default run takes ~10 s
    # Han et al.'s per-layer targets: 8% / 9% / 26% kept of 235,200 / 30,000 / 1,000 weights
    assert result["pruned_nonzero"] == round(0.08 * 235_200) + round(0.09 * 30_000) + round(0.26 * 1_000)
    assert result["dense_acc"] > 0.92
    assert result["pruned_acc"] > result["dense_acc"] - 0.01  # 12x fewer weights, at most 1 point lost


def import_example(name: str):
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        return __import__(name)
    finally:
        sys.path.pop(0)


@pytest.mark.slow
def test_mnist_pipeline_reduced(tmp_path, capfd):
    pipeline = import_example("mnist_pipeline")
    result = pipeline.main(["--epochs", "12", "--teacher-epochs", "3", "--limit", "1000", "--sparsity", "0.5",
                            "--out", str(tmp_path)])
    printed = capfd.readouterr()
    # output is not a terminal here: one progress line per epoch, no progress bar, no exporter noise
    assert "teacher: epoch 3/3" in printed.out and "student: epoch 12/12" in printed.out
    assert "torchvision" not in printed.out + printed.err and "it/s]" not in printed.err
    lat, deployed = result["latency_ms"], result["deployed_ms"]
    change = pipeline.speed_change(lat["teacher_onnx"], deployed["deployed"])
    assert f"({change}; int8 in " in printed.out.split("latency, batch 256, ONNX Runtime")[1][:80]
    # int8 only where it pays: the deployed file is never slower than the student's own fp32 export (as measured)
    choice = result["int8_choice"]
    assert [row["name"] for row in choice["layers"]] == ["features.3", "head.0", "head.2"]  # the first conv: fp32
    assert deployed["deployed"] < deployed["fp32"] or (choice["int8_layers"] == [] and
                                                       deployed["deployed"] == deployed["fp32"])
    assert "int8 or float per quantized layer (ONNX Runtime, batch 256" in printed.out
    files = {p.name for p in tmp_path.iterdir()}
    assert {"teacher.pt", "student.safetensors", "student.onnx", "compression_report.json", "pipeline.json",
            "compression_layers.png", "compression_tradeoff.png"} <= files
    assert abs(result["onnx_acc"] - result["student_acc"]) <= 0.01  # int8 layers as trained, float ones unquantized
    assert result["student_sparsity"] == pytest.approx(0.5, abs=0.01)
    assert result["teacher_bytes"] > 10 * result["student_compact_bytes"]
    assert result["teacher_acc"] > 0.7 and result["student_acc"] > 0.5  # trained: 1,000 digits, 3 and 12 epochs
    assert result["latency_ms"]["student_onnx"] > 0 and result["latency_ms"]["teacher_onnx"] > 0


@pytest.mark.slow
@pytest.mark.parametrize(("script", "expect"), [("bench_pruning.py", "| lightning |"),
                                                ("bench_qat.py", "ONNX Runtime static quantization of fp32"),
                                                ("bench_distillation.py", "with no data (RandomInputs)"),
                                                ("bench_channels.py", "(3.95x fewer)"),
                                                ("bench_lowrank.py", "at the change ->"),
                                                ("bench_int8_kernels.py", "int8 weights (previous release)"),
                                                ("bench_int8_choice.py", "| kind | rewritten |"),
                                                ("bench_property.py", "| generated | 2 |")])
def test_benchmark_quick(tmp_path, script, expect):
    out = tmp_path / "result.json"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--quick", "--out", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert expect in run.stdout and out.exists()


def test_bench_compact_runs(tmp_path):
    out = tmp_path / "compact.json"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_compact.py"), "--out", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "| int4 |" in run.stdout and out.exists()


def test_bench_heads_quick(tmp_path):
    out = tmp_path / "heads.json"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_heads.py"), "--quick", "--out", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"bert", "gpt2", "llama"}
    for r in results.values():
        assert r["attention_groups"] == 1  # one block: its heads are one group
        assert r["pruned"]["parameters"] < r["dense"]["parameters"] and r["pruned"]["flops"] < r["dense"]["flops"]
        assert r["max_abs_diff_removed_vs_masked"] <= 1e-5 * max(1.0, r["output_scale"])


@pytest.mark.slow
def test_pruning_defaults_on_mnist_quick():
    """Issue 10's setting at the benchmark's smallest size: the defaults keep a 12.5x pruned LeNet-300-100 close to
    the dense model, where the defaults before (per-layer threshold, target at the last step) lost 16-37 points."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_defaults
    finally:
        sys.path.pop(0)
    result = bench_defaults.main(["--quick", "--rows", "defaults", "old_defaults"])
    dense, new, old = (result["acc"][k][0] for k in ("dense", "defaults", "old_defaults"))
    assert result["kept"]["defaults"] == pytest.approx(0.08, abs=0.001)
    assert new > dense - 0.05 and new > old + 0.2, (dense, new, old)  # 2 epochs with pruning: noisy, so 5 pts


@pytest.mark.slow
def test_distill_gpt2_quick(tmp_path, capfd):
    example = import_example("distill_gpt2")
    result = example.main(["--quick", "--out", str(tmp_path)])
    ppl, params = result["perplexity"], result["parameters"]
    assert params["teacher"] >= 4 * params["student"]
    assert all(1 < p < 256 for p in ppl.values()), ppl  # below a uniform guess over 256 bytes: all three learned
    assert result["student_sparsity"] == pytest.approx(0.3, abs=0.05)  # pruned in the same fit
    assert (tmp_path / "distill_gpt2.json").exists() and (tmp_path / "compression_report.json").exists()
    assert "share of the scratch-to-teacher gap closed by distillation" in capfd.readouterr().out
