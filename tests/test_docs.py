"""README.md and docs/*.md run as written: every ```python block executes (doctest-style, each in a fresh
namespace; a block whose first line is ``# fragment...`` is a piece of a larger program and is only compiled), and
every dotted ``drpost.*`` name they mention resolves to a module or attribute.
Offline and small: the blocks build tiny models from configs.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
NAME = re.compile(r"\bdrpost(?:\.[A-Za-z_][A-Za-z0-9_]*)+")


def python_blocks() -> list[tuple[str, str]]:
    out = []
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        for m in BLOCK.finditer(text):
            line = text[: m.start()].count("\n") + 1
            out.append((f"{path.name}:{line}", m.group(1)))
    return out


@pytest.mark.parametrize("where, code", python_blocks(), ids=[w for w, _ in python_blocks()])
def test_python_block_runs(where, code, capsys):
    if code.startswith("# fragment"):  # a piece of a larger program (e.g. under torchrun): compile only
        compile(code, where, "exec")
        return
    exec(compile(code, where, "exec"), {"__name__": "__docs__"})


def resolve(name: str) -> object:
    """The module or attribute ``name`` (a dotted path): the longest importable module prefix, then attributes."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(name)


def mentioned_names() -> list[tuple[str, str]]:
    seen = {}
    for path in DOCS:
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            for m in NAME.finditer(line):
                name = m.group(0).rstrip(".")
                seen.setdefault(name, f"{path.name}:{i}")
    return sorted(seen.items())


@pytest.mark.parametrize("name, where", mentioned_names())
def test_mentioned_names_resolve(name, where):
    try:
        resolve(name)
    except (ImportError, AttributeError) as e:
        pytest.fail(f"{where}: {name} does not resolve ({type(e).__name__}: {e})")


def test_the_extractor_finds_the_readme_step():
    assert any("DataRegularizer" in code for _, code in python_blocks())


def test_docstrings_point_to_docs_in_the_repository():
    missing = ("DESIGN" + ".md", "REFERENCE" + ".md")  # design notes that are not part of the package
    bad = [f"{p.relative_to(REPO)}:{i}" for p in sorted((REPO / "src").rglob("*.py"))
           for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1)
           if any(m in line for m in missing)]
    assert not bad, f"point these to docs/design.md instead: {bad}"
    assert (REPO / "docs" / "design.md").is_file()
