"""The documentation stays true: every public name has a reference entry, every Python block of the docs and the
README runs as written, and every stated speed-up or size ratio is one that ``benchmarks/RESULTS.md`` measured.

Python blocks: every block fenced as ```` ```python ```` in ``docs/**/*.md`` and ``README.md`` runs on its own, in
a fresh namespace and a fresh temporary working directory (files it writes land there). So every block is
self-contained: it imports what it uses and builds what it needs; blocks of one page never share state. A block
that cannot run as written (it needs GPUs, or your model) gets a ``<!-- skip -->`` line right before its fence; one
that takes more than about 30 s gets ``<!-- slow -->`` (it then runs under ``pytest -m slow`` and in the full
suite). Other fences (```` ```bash ````, ```` ```text ````, ```` ```yaml ````) are not run; ```` ```py ```` and other
spellings of Python are refused, so no block skips the test by its fence alone.

Figures: every number written before "x smaller", "x faster", "x fewer" or "x slower" in the docs or the README
(each end of a range such as "7.1-8.3x faster" or "3.18x / 2.71x faster") must appear in ``benchmarks/RESULTS.md``
as that number followed by "x", so a figure edited in one place only fails here. Program output shown in
```` ```text ```` blocks (one run's output, e.g. the main example's) is exempt. The main example's stated run time
("about two minutes on 2 quiet CPU cores") is checked against the wall times RESULTS.md records for it.

Also: the README stays a front door (at most 150 lines, the two commands exactly as CI runs them, links that
resolve), the design page lists tests/test_imports.py's import layers, and the site's docstring rendering
(``docs/_ext/doctest_blocks.py``) fences bare doctests.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
PAGES = sorted([*DOCS.rglob("*.md"), README])

# Every public module: its `__all__` is the public API, and each name in it needs a `::: <module>.<name>` entry in
# docs/reference/ (an entry for the same object under another public path counts).
PUBLIC_MODULES = [
    "litcompress",
    "litcompress.callbacks",
    "litcompress.modules",
    "litcompress.sparsity",
    "litcompress.quantization",
    "litcompress.factorization",
    "litcompress.structure",
    "litcompress.distillation",
    "litcompress.report",
    "litcompress.export",
    "litcompress.schedules",
    "litcompress.selection",
    "litcompress.layers",
    "litcompress.distributed",
    "litcompress.data",
]
MAIN_EXAMPLE_TIME = "about two minutes on 2 quiet CPU cores"
PYTHON_ALIASES = {"py", "python3", "py3", "pycon", "ipython"}


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    marker: str | None  # "skip" or "slow": an HTML comment on the line before the fence


def blocks(page: Path) -> list[Block]:
    """The fenced blocks of a page, top level or indented (as in a list item), with their markers."""
    found, lines, i = [], page.read_text().split("\n"), 0
    while i < len(lines):
        opening = re.match(r"^(\s*)(`{3,})\s*([\w+-]*)", lines[i])
        if not opening:
            i += 1
            continue
        indent, fence, lang = opening.groups()
        start, body = i, []
        i += 1
        while i < len(lines) and not re.match(rf"^\s*{fence}\s*$", lines[i]):
            body.append(lines[i][len(indent):] if lines[i].startswith(indent) else lines[i])
            i += 1
        before = next((lines[j].strip() for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        marker = re.fullmatch(r"<!--\s*(skip|slow)\s*-->", before)
        found.append(Block(page, start + 1, lang.lower(), "\n".join(body) + "\n", marker[1] if marker else None))
        i += 1
    return found


def python_blocks() -> list[Any]:
    params = []
    for page in PAGES:
        for block in blocks(page):
            if block.lang != "python" or block.marker == "skip":
                continue
            marks = [pytest.mark.slow] if block.marker == "slow" else []
            params.append(pytest.param(block, marks=marks, id=f"{_rel(page)}:{block.line}"))
    return params


@pytest.mark.parametrize("block", python_blocks())
def test_python_block_runs(block: Block, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    exec(compile(block.code, f"{_rel(block.page)}:{block.line}", "exec"), {"__name__": "__docs__"})


def test_pages_have_python_blocks_and_no_other_python_fences() -> None:
    every = [b for page in PAGES for b in blocks(page)]
    assert len([b for b in every if b.lang == "python" and b.marker != "skip"]) >= 10
    readme = [b for b in blocks(README) if b.lang == "python"]
    assert len(readme) == 1 and readme[0].marker is None, "the README's one example runs"
    wrong = [f"{_rel(b.page)}:{b.line} ({b.lang})" for b in every if b.lang in PYTHON_ALIASES]
    assert not wrong, f"fence Python as ```python (with <!-- skip --> if it must not run): {wrong}"
    stray = [f"{_rel(b.page)}:{b.line}" for b in every if b.marker and b.lang != "python"]
    assert not stray, f"<!-- skip --> / <!-- slow --> before a block that is not Python: {stray}"


# --- reference entries --------------------------------------------------------------------------------------------


def reference_entries() -> dict[str, Path]:
    entries = {}
    for page in sorted((DOCS / "reference").glob("*.md")):
        for match in re.finditer(r"^:::\s+(\S+)", page.read_text(), flags=re.M):
            entries[match[1]] = page
    return entries


def resolve(identifier: str) -> Any:
    """The object a `::: a.b.C` entry renders: the longest importable module prefix, then attributes."""
    parts = identifier.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(identifier)


def test_every_public_module_is_listed() -> None:
    package = ROOT / "litcompress"
    units = {p.stem for p in package.iterdir() if not p.name.startswith(("_", ".")) and
             (p.suffix == ".py" or (p / "__init__.py").exists())}
    listed = {m.split(".")[1] for m in PUBLIC_MODULES if "." in m}
    assert units == listed, f"not in PUBLIC_MODULES: {sorted(units - listed)}; gone: {sorted(listed - units)}"


def test_reference_entries_resolve() -> None:
    entries = reference_entries()
    assert entries, "docs/reference/ has no ::: entries"
    broken = []
    for identifier, page in entries.items():
        try:
            resolve(identifier)
        except (ImportError, AttributeError) as err:
            broken.append(f"{_rel(page)}: ::: {identifier} ({err})")
    assert not broken, "reference entries naming nothing:\n" + "\n".join(broken)


def test_every_public_name_has_a_reference_entry() -> None:
    entries = reference_entries()
    objects = {}
    for identifier in entries:
        try:
            objects[identifier] = resolve(identifier)
        except (ImportError, AttributeError):
            continue  # reported by test_reference_entries_resolve
    missing = []
    for module_name in PUBLIC_MODULES:
        module = importlib.import_module(module_name)
        for name in module.__all__:
            value = getattr(module, name)
            if f"{module_name}.{name}" in entries:
                continue
            if isinstance(value, ModuleType):  # a public submodule: documented by entries inside it
                if any(e == value.__name__ or e.startswith(value.__name__ + ".") for e in entries):
                    continue
            elif any(e.rsplit(".", 1)[-1] == name and obj is value for e, obj in objects.items()):
                continue
            missing.append(f"{module_name}.{name}")
    assert not missing, "public names without a `::: ...` entry in docs/reference/*.md:\n" + "\n".join(missing)


# --- figures ------------------------------------------------------------------------------------------------------

# "63.7x smaller", "7.1-8.3x faster", "1.85x-2.14x faster", "3.18x / 2.71x faster"
_FIGURE = re.compile(r"((?:\d+(?:\.\d+)?x?\s*[-/–]\s*)*\d+(?:\.\d+)?)x\s+(?:smaller|faster|fewer|slower)\b")


def prose(page: Path) -> str:
    """The page without its ```text blocks (program output: one run's figures, not claims)."""
    text = page.read_text()
    for block in blocks(page):
        if block.lang == "text":
            text = text.replace(block.code, "")
    return text


def stated_figures(text: str) -> list[str]:
    return [n for m in _FIGURE.finditer(text) for n in re.split(r"x?\s*[-/–]\s*", m[1]) if n]


def test_figure_extraction() -> None:
    text = "63.7x smaller; 7.1-8.3x faster; 1.85x-2.14x faster; 3.18x / 2.71x faster; 12x higher; 2.0x\nfewer"
    assert stated_figures(text) == ["63.7", "7.1", "8.3", "1.85", "2.14", "3.18", "2.71", "2.0"]


def test_stated_figures_appear_in_results() -> None:
    results = RESULTS.read_text()
    wrong = []
    for page in PAGES:
        for number in stated_figures(prose(page)):
            if not re.search(rf"(?<![\d.]){re.escape(number)}x", results):
                wrong.append(f"{_rel(page)}: {number}x")
    assert not wrong, "figures that benchmarks/RESULTS.md does not contain:\n" + "\n".join(sorted(set(wrong)))


def test_headline_figures_are_stated() -> None:
    """The main example's and the GPT-2 example's headline figures are on the pages (and so checked above)."""
    assert "63.7x smaller" in README.read_text() and "63.7x smaller" in (DOCS / "quickstart.md").read_text()
    assert "6.9x smaller student" in (DOCS / "distillation.md").read_text()
    assert "7.1-8.3x faster" in (DOCS / "quickstart.md").read_text()


def pipeline_wall_times(results: str) -> list[float]:
    """The wall times (seconds) of the last RESULTS.md section whose command runs examples/mnist_pipeline.py."""
    sections = [s for s in re.split(r"\n(?=## )", results) if "python examples/mnist_pipeline.py" in s]
    for section in reversed(sections):
        for table in re.findall(r"(?:^\|.*\|\n)+", section, flags=re.M):
            rows = [[c.strip() for c in row.strip("|").split("|")] for row in table.strip().split("\n")]
            if "wall" in rows[0] or "wall time" in rows[0]:
                column = rows[0].index("wall") if "wall" in rows[0] else rows[0].index("wall time")
                return [float(re.match(r"[\d.]+", row[column])[0]) for row in rows[2:]]  # type: ignore[index]
    raise AssertionError("no wall-time table for examples/mnist_pipeline.py in benchmarks/RESULTS.md")


def test_main_example_time_matches_results() -> None:
    walls = pipeline_wall_times(RESULTS.read_text())
    assert len(walls) >= 3
    assert 90 <= statistics.median(walls) <= 150, f"RESULTS.md: {walls} s; update '{MAIN_EXAMPLE_TIME}' in the docs"
    for page in (README, DOCS / "quickstart.md", DOCS / "index.md"):
        assert MAIN_EXAMPLE_TIME in " ".join(page.read_text().split()), _rel(page)


# --- the README as a front door -----------------------------------------------------------------------------------

MAIN_COMMAND = 'pip install torch==2.13.0 && pip install -e ".[examples]" && python examples/mnist_pipeline.py'
TEST_COMMAND = 'pip install torch==2.13.0 && pip install -e ".[test]" && pytest'


def test_readme_is_a_front_door() -> None:
    text = README.read_text()
    assert len(text.split("\n")) <= 150
    assert MAIN_COMMAND in text and TEST_COMMAND in text
    assert 'pytest -m "not slow"' in text and "12-22 minutes" in text
    ci = (ROOT / ".ci" / "run").read_text().split("\n")
    assert "pip install -q torch==2.13.0" in ci and 'pip install -q -e ".[dev]"' in ci
    assert "pytest" in ci, "CI runs the README's test command, `pytest`"
    assert any(line.startswith("mkdocs build --strict") for line in ci)


def test_readme_links_exist() -> None:
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", README.read_text())
    local = [t for t in targets if not re.match(r"[a-z]+://", t)]
    assert any(t.startswith("docs/") for t in local) and "benchmarks/RESULTS.md" in local
    missing = [t for t in local if not (ROOT / t).exists()]
    assert not missing, f"README links to files that do not exist: {missing}"


# --- the site's docstring rendering -------------------------------------------------------------------------------


def _doctest_blocks() -> ModuleType:
    spec = importlib.util.spec_from_file_location("doctest_blocks", DOCS / "_ext" / "doctest_blocks.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bare_doctests_render_as_code() -> None:
    ext = _doctest_blocks()
    text = inspect.cleandoc("""Sum.

        >>> [1, 2][0]
        1
        Done.

        Args:
            x: a value, e.g.

                >>> x = 1

        Examples:
            >>> 1 + 1
            2
        """)
    assert ext.fence_doctests(text).split("\n") == [
        "Sum.", "", "```pycon", ">>> [1, 2][0]", "1", "Done.", "```", "", "Args:", "    x: a value, e.g.", "",
        "        ```pycon", "        >>> x = 1", "        ```", "", "Examples:", "    >>> 1 + 1", "    2"]
    assert ext.plain_roles("see :class:`~litcompress.Pruning` and :func:`litcompress.export.export_onnx`") == (
        "see `Pruning` and `litcompress.export.export_onnx`")


def test_design_page_lists_the_import_layers() -> None:
    """The design page's layer table is tests/test_imports.py's LAYERS, bottom first."""
    from tests.test_imports import LAYERS

    rows = re.findall(r"^\| (\d+) \| (.+?) \|$", (DOCS / "design.md").read_text(), flags=re.M)
    assert [int(n) for n, _ in rows] == list(range(len(LAYERS)))
    assert [re.findall(r"`([\w.]+)`", units) for _, units in rows] == LAYERS
