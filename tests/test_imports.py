"""The pure-torch parts import without Lightning or torchmetrics; the top-level names still work (lazily)."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import pytest

PURE = ["litcompress", "litcompress.sparsity", "litcompress.quantization", "litcompress.distillation",
        "litcompress.schedules", "litcompress.export", "litcompress.report", "litcompress.selection",
        "litcompress.data", "litcompress.structure", "litcompress.factorization", "litcompress.layers",
        "litcompress.distributed"]
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


# The layers of the package, bottom first (the design page lists the same). A module may import modules of its own
# unit (package or module) and of lower layers only, never of a higher layer nor of another unit of its own layer;
# and no chain of imports comes back to where it started. Every import counts, including those inside functions
# and under TYPE_CHECKING: a lazy import from a higher layer is still an upward dependency.
LAYERS: list[list[str]] = [
    ["_validation"],
    ["_compat", "_extras", "_timing", "_shards", "_calls", "layers"],
    ["schedules", "selection", "data", "distributed"],
    ["quantization", "distillation"],
    ["sparsity", "factorization"],
    ["structure"],
    ["export"],
    ["report"],
    ["callbacks", "modules"],
]
ROOT = pathlib.Path(__file__).resolve().parent.parent / "litcompress"


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}

    def owner(name: str) -> str:  # `from litcompress.x import name` names a module or a name in one
        while name not in modules:
            name = name.rpartition(".")[0]
        return name

    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found |= {owner(a.name) for a in node.names if a.name.split(".")[0] == "litcompress"}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*parent, *([base] if base else [])])
                if base.split(".")[0] == "litcompress":
                    found |= {owner(f"{base}.{a.name}") if f"{base}.{a.name}" in modules else owner(base)
                              for a in node.names}
        graph[name] = found - {name}
    return graph


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_every_unit_is_in_a_layer():
    units = {_unit(m) for m in _import_graph()} - {""}
    placed = {u for layer in LAYERS for u in layer}
    assert units == placed, f"not placed: {sorted(units - placed)}; gone: {sorted(placed - units)}"


def test_imports_run_downward_only():
    level = {u: i for i, layer in enumerate(LAYERS) for u in layer}
    level[""] = len(LAYERS)  # `litcompress/__init__.py` sits on top
    wrong = sorted(f"{a} -> {b}" for a, deps in _import_graph().items() for b in deps
                   if _unit(a) != _unit(b) and level[_unit(b)] >= level[_unit(a)])
    assert not wrong, "imports from a layer up to one at or above it:\n" + "\n".join(wrong)


def test_no_import_circles():
    graph = _import_graph()
    circles: list[list[str]] = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                circles.append([*path[path.index(dep):], dep])
            elif dep not in state:
                visit(dep, [*path, dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not circles, "import circles:\n" + "\n".join(" -> ".join(c) for c in circles)


def test_the_checker_finds_a_circle_and_an_upward_import(tmp_path, monkeypatch):
    """The walk above must see what it is meant to catch: a planted circle and a planted upward import."""
    package = tmp_path / "litcompress"
    (package / "sparsity").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sparsity" / "__init__.py").write_text("from litcompress.sparsity.a import x\n")
    (package / "sparsity" / "a.py").write_text("def f():\n    from litcompress.sparsity.b import y\nx = 1\n")
    (package / "sparsity" / "b.py").write_text(
        "from litcompress.sparsity import a\nfrom litcompress.export import z\ny = 1\n")
    (package / "export.py").write_text("z = 1\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", package)
    graph = _import_graph()
    assert graph["litcompress.sparsity.a"] == {"litcompress.sparsity.b"}
    assert graph["litcompress.sparsity.b"] == {"litcompress.sparsity.a", "litcompress.export"}
    with pytest.raises(AssertionError, match=r"sparsity\.a -> litcompress\.sparsity\.b -> litcompress\.sparsity\.a"):
        test_no_import_circles()
    with pytest.raises(AssertionError, match=r"litcompress\.sparsity\.b -> litcompress\.export"):
        test_imports_run_downward_only()
