"""Missing optional dependencies: a clear message naming the extra to install, never a raw error from inside
torch.onnx or safetensors; the report warns and lets the fit finish. Each case hides modules in a fresh process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import json, sys, warnings
import lightning, torchmetrics  # their own optional imports happen first (torchmetrics imports matplotlib)
for name in {hidden!r}:
    for key in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
        del sys.modules[key]
    sys.modules[name] = None  # `import name` (and its submodules) now raises ModuleNotFoundError
sys.path.insert(0, {root!r})
import torch
from torch import nn
out = {{}}

def attempt(key, fn):
    try:
        fn()
        out[key] = "ok"
    except Exception as err:
        out[key] = f"{{type(err).__name__}}: {{err}}"

from litcompress.export import export_onnx, load_compressed, save_compressed
from litcompress.report import plot_layers, summarize
attempt("save_compressed", lambda: save_compressed(nn.Linear(2, 2), {tmp!r} + "/m.safetensors"))
attempt("load_compressed", lambda: load_compressed(nn.Linear(2, 2), {tmp!r} + "/m.safetensors"))
attempt("export_onnx", lambda: export_onnx(nn.Linear(2, 2), torch.randn(1, 2), {tmp!r} + "/m.onnx"))
attempt("plot_layers", lambda: plot_layers(summarize(nn.Linear(2, 2), torch.randn(1, 2), latency=False),
                                           {tmp!r} + "/p.png"))

import lightning.pytorch as pl
from litcompress import CompressionReport, QuantizationAwareTraining
from tests.helpers import fit
report = CompressionReport(input_shape=[4, 16], metrics=[], repeats=2, dirpath={tmp!r})
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    trainer, _ = fit(__import__("pathlib").Path({tmp!r}), [QuantizationAwareTraining(verbose=False), report],
                     max_epochs=1)
out["fit_steps"] = trainer.global_step
out["report"] = None if report.report is None else {{k: report.report["final"][k]
                                                     for k in ("latency_eager", "latency_onnx")}}
out["warnings"] = [str(w.message) for w in caught if "CompressionReport" in str(w.message)]
print("RESULT" + json.dumps(out))
"""


def _run(hidden: list[str], tmp_path: Path) -> dict:
    code = SCRIPT.format(hidden=hidden, root=str(ROOT), tmp=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.split("RESULT", 1)[1])


DEPLOY = 'pip install "litcompress[deploy]"'


def test_without_safetensors(tmp_path):
    out = _run(["safetensors"], tmp_path)
    for key in ("save_compressed", "load_compressed"):
        assert out[key] == f"ModuleNotFoundError: safetensors, which it needs, is not installed in `{key}`. To " \
                           f"fix: {DEPLOY}."
    assert out["export_onnx"] == "ok"  # ONNX export does not need it
    assert "plot_layers" in out and "safetensors" in out["plot_layers"]  # summarize measures real files
    assert out["fit_steps"] == 4 and out["report"] is None  # the fit finished; no report
    assert any("no report for this fit" in w and DEPLOY in w for w in out["warnings"]), out["warnings"]


@pytest.mark.parametrize("hidden", [["onnxscript"], ["onnxruntime"]])
def test_without_the_onnx_stack(tmp_path, hidden):
    out = _run(hidden, tmp_path)
    assert out["save_compressed"] == "ok" and out["plot_layers"] == "ok"
    if hidden == ["onnxscript"]:
        assert out["export_onnx"] == ("ModuleNotFoundError: onnxscript, which it needs, is not installed in "
                                      f"`export_onnx`. To fix: {DEPLOY}.")
    else:
        assert out["export_onnx"] == "ok"  # exporting needs no runtime
    assert out["fit_steps"] == 4 and out["report"]["latency_eager"] > 0 and out["report"]["latency_onnx"] is None
    assert any("no ONNX Runtime latency" in w and DEPLOY in w for w in out["warnings"]), out["warnings"]


def test_without_matplotlib(tmp_path):
    out = _run(["matplotlib"], tmp_path)
    assert out["plot_layers"] == ('ModuleNotFoundError: matplotlib, which it needs, is not installed in `Plots`. To '
                                  'fix: pip install "litcompress[report]".')
    assert out["fit_steps"] == 4 and out["report"] is not None  # the report is written, without charts
    assert any("no plots" in w and "litcompress[report]" in w for w in out["warnings"]), out["warnings"]
