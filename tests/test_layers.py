"""The package's layers, read from its imports (``ast``; imports inside functions count, ``if TYPE_CHECKING:``
blocks do not): no import circle between modules, and no module imports a higher layer.

Layers, lowest first (a module may import its own layer and lower ones):
  0 core: geometry, feasible, objectives, data, optim, step, models, config (and the package root ``drpost``)
  1 trainers, baselines, integrations
  2 world
  3 bench, cli
The layers are described in docs/design.md. Known exceptions in files owned elsewhere would be listed below with their
reason (there are none; a listed exception that has been fixed is simply no longer seen).
"""

from __future__ import annotations

import ast
import functools
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
LAYERS = {
    "geometry": 0, "feasible": 0, "objectives": 0, "data": 0, "optim": 0, "step": 0, "models": 0, "config": 0,
    "__main__": 3, "trainers": 1, "baselines": 1, "integrations": 1, "world": 2, "bench": 3, "cli": 3,
}

# (importer, imported) pairs that break the layer rule today, in modules this change does not own (none left: the
# trainers take data, rewards and evaluation as arguments, ``drpost.trainers.sources``; the world's side of the CLI
# runs is ``drpost.world.runs``):
KNOWN_LAYER_EXCEPTIONS: set[tuple[str, str]] = set()
# import circles (as sets of modules) in modules this change does not own (none left):
KNOWN_CYCLES: list[set[str]] = []


def _modules() -> dict[str, Path]:
    out = {}
    for p in (SRC / "drpost").rglob("*.py"):
        parts = list(p.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in node.body:
                lines.update(range(sub.lineno, (sub.end_lineno or sub.lineno) + 1))
    return lines


@functools.cache
def import_graph() -> dict[str, set[str]]:
    """module -> the drpost modules it imports (a ``from pkg import name`` that names a submodule counts as it)."""
    mods = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skip = _type_checking_lines(tree)
        is_pkg = path.name == "__init__.py"
        targets: set[str] = set()
        for node in ast.walk(tree):
            if getattr(node, "lineno", None) in skip:
                continue
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".")
                    base = base[: len(base) - node.level + (1 if is_pkg else 0)]
                    mod = ".".join(base + ([node.module] if node.module else []))
                else:
                    mod = node.module or ""
                targets.add(mod)
                targets.update(f"{mod}.{a.name}" for a in node.names)
        graph[name] = {t for t in targets if t in mods and t != name}
    return graph


def layer_of(module: str) -> int:
    parts = module.split(".")
    return 0 if len(parts) == 1 else LAYERS[parts[1]]


def test_every_module_has_a_layer():
    missing = sorted({m.split(".")[1] for m in _modules() if "." in m and m.split(".")[1] not in LAYERS})
    assert not missing, f"give these top-level modules a layer in LAYERS (and docs/design.md): {missing}"


def test_no_module_imports_a_higher_layer():
    bad = sorted((a, b) for a, deps in import_graph().items() for b in deps
                 if layer_of(b) > layer_of(a) and (a, b) not in KNOWN_LAYER_EXCEPTIONS)
    assert not bad, "imports of a higher layer:\n" + "\n".join(f"  {a} -> {b}" for a, b in bad)


def _cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[set[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(comp)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circle():
    known = [set(c) for c in KNOWN_CYCLES]
    bad = [sorted(c) for c in _cycles(import_graph()) if c not in known]
    assert not bad, "import circles:\n" + "\n".join("  " + " <-> ".join(c) for c in bad)


def test_trainers_never_import_the_world():
    """The rule this layering is for, spelled out: trainers see generic callables and datasets only."""
    bad = sorted((a, b) for a, deps in import_graph().items() for b in deps
                 if a.startswith("drpost.trainers") and (b == "drpost.world" or b.startswith("drpost.world.")))
    assert not bad, bad


def test_the_checker_sees_circles_and_layer_breaks():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]
    graph = import_graph()
    assert "drpost.step" in graph["drpost.trainers.sft"]  # imports inside functions are read too
    assert layer_of("drpost.world.settings") == 2 and layer_of("drpost") == 0
