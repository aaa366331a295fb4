"""The README's Python blocks run as written; the examples and benchmark scripts run end to end."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_readme_has_python_blocks():
    assert len(readme_blocks()) >= 2


@pytest.mark.parametrize("index", range(len(readme_blocks())))
def test_readme_python_block_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(readme_blocks()[index], f"README.md block {index}", "exec"), {"__name__": "__readme__"})


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


@pytest.mark.slow
@pytest.mark.parametrize(("script", "expect"), [("bench_pruning.py", "| lightning |"),
                                                ("bench_qat.py", "ONNX Runtime static quantization of fp32"),
                                                ("bench_distillation.py", "label-free from RandomInputs")])
def test_benchmark_quick(tmp_path, script, expect):
    out = tmp_path / "result.json"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--quick", "--out", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert expect in run.stdout and out.exists()
