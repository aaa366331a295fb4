"""Griffe extension for the documentation site: docstrings written for ``pytest --doctest-modules`` and Sphinx
roles render cleanly as Markdown.

litcompress's docstrings carry doctests (``>>>`` lines) in their running text and in ``Example:`` sections (an
admonition to Google-style parsing). Only an ``Examples:`` section becomes code; elsewhere Markdown would read
``>>>`` as nested quotes and an output such as ``[None, 2][0]`` as a link. This wraps every such run of lines
(from a ``>>>`` line to the next blank line) in a ``pycon`` fence, leaving ``Examples:`` sections to the parser,
and turns Sphinx roles (``:class:`~litcompress.Pruning```) into code spans. Loaded by ``mkdocs.yml``
(mkdocstrings' ``extensions`` option); the docstrings themselves are unchanged.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:class|func|meth|attr|mod|data|exc|obj|const):`(~?)([^`]+)`")
_SECTION = re.compile(r"Examples:\s*$")  # the section Google-style parsing turns into code itself


def fence_doctests(text: str) -> str:
    """``text`` with each run of doctest lines outside ``Examples:`` sections fenced as ``pycon`` (a blank line
    is added before the fence where needed). ``tests/test_docs.py`` checks it."""
    lines, out, i = text.split("\n"), [], 0
    section_indent: int | None = None  # inside an `Examples:` section, indented deeper than this
    while i < len(lines):
        line = lines[i]
        stripped = line.lstrip()
        indent = len(line) - len(stripped)
        if section_indent is not None and stripped and indent <= section_indent:
            section_indent = None
        if section_indent is None and _SECTION.match(stripped):
            section_indent = indent
        if section_indent is None and stripped.startswith(">>>"):
            block = []
            while i < len(lines) and lines[i].strip():
                block.append(lines[i])
                i += 1
            if out and out[-1].strip():
                out.append("")
            out += [" " * indent + "```pycon", *block, " " * indent + "```"]
            continue
        out.append(line)
        i += 1
    return "\n".join(out)


def plain_roles(text: str) -> str:
    """Sphinx cross-reference roles as Markdown code spans: the last name with ``~``, the whole path without."""
    return _ROLE.sub(lambda m: f"`{m[2].rsplit('.', 1)[-1] if m[1] else m[2]}`", text)


class DoctestBlocks(griffe.Extension):
    """Fence the bare doctests and plain the Sphinx roles of every docstring once the object tree is built."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = plain_roles(fence_doctests(obj.docstring.value))
