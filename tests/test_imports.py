"""The pure-torch parts import without Lightning or torchmetrics; the top-level names still work (lazily)."""

from __future__ import annotations

import subprocess
import sys

import pytest

PURE = ["litcompress", "litcompress.sparsity", "litcompress.quantization", "litcompress.distillation",
        "litcompress.schedules", "litcompress.export", "litcompress.report", "litcompress.selection",
        "litcompress.data"]
HEAVY = ("lightning", "pytorch_lightning", "torchmetrics")


def _loaded_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys; print(' '.join(sys.modules))"],
                         capture_output=True, text=True, timeout=120, check=True).stdout
    return set(out.split())


def test_pure_torch_packages_import_without_lightning():
    loaded = _loaded_after("\n".join(f"import {name}" for name in PURE))
    assert not loaded & set(HEAVY), sorted(loaded & set(HEAVY))


def test_top_level_names_load_lightning_on_first_use():
    names = ["Pruning", "QuantizationAwareTraining", "CompressionReport", "DistillationModule"]
    checks = "\n".join(f"assert litcompress.{n}.__name__ == {n!r}" for n in names)
    assert "lightning" in _loaded_after(f"import litcompress\n{checks}")
    assert "lightning" in _loaded_after(f"from litcompress import {', '.join(names)}")


def test_unknown_attribute_is_an_attribute_error():
    import litcompress

    with pytest.raises(AttributeError, match="no attribute 'Prunning'"):
        litcompress.Prunning  # noqa: B018
    assert "Pruning" in dir(litcompress)
