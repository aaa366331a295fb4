"""ONNX export: ONNX Runtime runs the quantized graph on integer kernels and agrees with the torch model."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from litcompress import QuantizationAwareTraining
from litcompress.export import export_onnx
from tests.helpers import fit
from tests.models import ZOO

INTEGER_KERNELS = {"QGemm", "QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat", "QLinearConv", "ConvInteger",
                   "DynamicQuantizeMatMul"}


def run_ort(path, x, tmp_path):
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    ops = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    return out, ops


def float_matmuls(ops):
    return [op for op in ops if op in ("Gemm", "MatMul", "FusedMatMul")]


@pytest.mark.parametrize("model", ["mlp", "transformer", "gpt"])
def test_quantized_export_runs_on_integer_kernels(tmp_path, model):
    cb = QuantizationAwareTraining(verbose=False)
    _, module = fit(tmp_path, [cb], model=model, n=None, max_epochs=1)
    module.eval()
    x = ZOO[model].data().tensors[0][:8]
    with torch.no_grad():
        expected = module(x).numpy()
    path = export_onnx(module, x, tmp_path / "model.onnx")
    assert not (tmp_path / "model.onnx.data").exists()
    out, ops = run_ort(path, x, tmp_path)
    assert INTEGER_KERNELS & set(ops), ops
    if model == "mlp":  # every Linear runs on an integer kernel
        assert float_matmuls(ops) == [], ops
    # agreement: outputs within a small fraction of their range; the same predictions
    assert np.abs(out - expected).max() <= 0.02 * (np.abs(expected).max() + 1e-6)
    assert (out.argmax(-1) == expected.argmax(-1)).mean() >= 0.98
    # the batch dimension is dynamic
    out2, _ = run_ort(path, torch.cat([x, x]), tmp_path)
    assert out2.shape[0] == 2 * x.shape[0]


@pytest.mark.parametrize("model", ["cnn", "lstm"])
def test_quantized_export_other_layers_agree(tmp_path, model):
    cb = QuantizationAwareTraining(verbose=False)
    _, module = fit(tmp_path, [cb], model=model, n=None, max_epochs=1)
    module.eval()
    x = ZOO[model].data().tensors[0][:8]
    with torch.no_grad():
        expected = module(x).numpy()
    out, ops = run_ort(export_onnx(module, x, tmp_path / "model.onnx"), x, tmp_path)
    assert "DequantizeLinear" in ops or INTEGER_KERNELS & set(ops)
    assert np.abs(out - expected).max() <= 0.02 * (np.abs(expected).max() + 1e-6)


def test_float_model_exports_plain_fp32(tmp_path):
    torch.manual_seed(0)
    model = ZOO["mlp"].build().eval()
    x = torch.randn(4, 16)
    out, ops = run_ort(export_onnx(model, x, tmp_path / "float.onnx"), x, tmp_path)
    assert not any("Quantize" in op for op in ops) and not INTEGER_KERNELS & set(ops)
    np.testing.assert_allclose(out, model(x).detach().numpy(), atol=1e-5)


def test_export_bad_input():
    with pytest.raises(TypeError, match="`example_input`"):
        export_onnx(ZOO["mlp"].build(), [1, 2], "x.onnx")
    with pytest.raises(TypeError, match="`model`"):
        export_onnx("model", torch.randn(2, 16), "x.onnx")
