"""Optional dependencies: which extra brings each one, and a clear message when one is missing.

The core (``pip install litcompress``) needs torch, Lightning and torchmetrics only. Deployment (ONNX export,
ONNX Runtime, compact safetensors files) and the report's charts come with extras; a call that needs a missing one
raises a ``ModuleNotFoundError`` that names the extra to install, before any work starts.

>>> missing("math", "json")
[]
>>> try:
...     require("surely_not_installed_pkg", what="this doctest")
... except ModuleNotFoundError as err:
...     print(err)  # doctest: +ELLIPSIS
surely_not_installed_pkg, which it needs, is not installed in `this doctest`. To fix: pip install ...
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence

__all__ = ["EXTRAS", "ONNX_EXPORT", "ONNX_RUNTIME", "install_hint", "missing", "require"]

EXTRAS = {
    "safetensors": "deploy",
    "onnx": "deploy",
    "onnxscript": "deploy",
    "onnxruntime": "deploy",
    "matplotlib": "report",
    "rich": "report",
    "jsonargparse": "cli",
    "transformers": "hf",
    "torch_pruning": "structured",
}
"""Optional module -> the extra that installs it (``pip install "litcompress[<extra>]"``)."""

ONNX_EXPORT = ("onnx", "onnxscript")
"""What ``torch.onnx.export`` (the dynamo exporter) needs besides torch."""
ONNX_RUNTIME = ("onnxruntime", *ONNX_EXPORT)
"""What exporting and timing a model in ONNX Runtime needs."""


def missing(*modules: str) -> list[str]:
    """The modules among ``modules`` that cannot be imported."""
    absent = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            absent.append(name)
    return absent


def install_hint(modules: Sequence[str]) -> str:
    """``pip install "litcompress[...]"`` for the extras that bring ``modules``."""
    extras = sorted({EXTRAS.get(m, "deploy") for m in modules})
    return "pip install " + " ".join(f'"litcompress[{e}]"' for e in extras)


def require(*modules: str, what: str) -> None:
    """Raise ``ModuleNotFoundError`` naming the extra to install when any of ``modules`` is missing."""
    absent = missing(*modules)
    if absent:
        # the run-time form of `_validation.fail_state` (what happened, where, the fix), as a ModuleNotFoundError
        raise ModuleNotFoundError(f"{', '.join(absent)}, which it needs, is not installed in `{what}`. To fix: "
                                  f"{install_hint(absent)}.", name=absent[0])
