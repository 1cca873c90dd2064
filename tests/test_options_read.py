"""Every option a subcommand shows in ``--help`` is read by the code that runs it, or refused by name.

Two checks:
- static (every subcommand): walking ``config.leaf_options`` of each command's config class, each option must be
  read in the modules its runner imports (``cli.RUNNERS``, import graph of tests/test_layers.py, the config package left
  out). Read means: the dotted chain ``group.field`` is accessed (``config.data.max_seq_length``, or through a local
  alias ``d = config.data; d.max_seq_length``), or the group object is taken from a config somewhere in those
  modules and the field is accessed as an attribute (``setup.load_model(config.model)`` then ``mc.lora_r``), or the
  dotted name is written out as a string (a table of read options). Top-level options: the attribute is accessed.
  This is a heuristic that catches options nobody reads; exceptions are listed with their reason.
- dynamic (commands with a table of the options they read: ``drpost demo``, ``drpost bench quality``): every
  other option, set to a non-default value, makes the runner raise a ConfigError naming it before any work.

And the method-name lists (``feasible.SETS``, ``kernels.METHODS``, ``bench.quality.METHODS``, ``bench.rl.METHODS``
and the config's choices) must agree.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import typing

import pytest

from drpost import cli
from drpost import config as C
from drpost.config import CONFIGS, ConfigError, leaf_options, schema
from tests.test_layers import _modules, import_graph

COMMANDS = {**{c: cls for c, cls in CONFIGS.items() if c != "bench"},
            **{f"bench {kind}": cls for kind, cls in C.BENCH_CONFIGS.items()}}

# (command, option) -> why it is not read and that is acceptable
EXCEPTIONS: dict[tuple[str, str], str] = {}


def _table(module: str):
    def read() -> frozenset[str]:
        import importlib

        return importlib.import_module(module).READ

    return read


# runners that read only the options in their READ table and refuse the others (checked dynamically below)
REFUSING_RUNNERS = {"demo": _table("drpost.bench.demo"), "bench quality": _table("drpost.bench.quality")}


def _reachable(module: str, graph: dict[str, set[str]]) -> set[str]:
    seen, todo = set(), [module]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(graph.get(m, ()))
    return seen


@functools.cache
def _uses(path) -> tuple[set[str], set[str], set[str]]:
    """(attribute names, 'group.field' chains incl. through local aliases, string constants) of one file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    alias: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name) \
                and isinstance(node.value, ast.Attribute):
            alias[node.targets[0].id] = node.value.attr
    attrs, chains, strings = set(), set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            attrs.add(node.attr)
            v = node.value
            if isinstance(v, ast.Attribute):
                chains.add(f"{v.attr}.{node.attr}")
            elif isinstance(v, ast.Name):
                chains.add(f"{alias.get(v.id, v.id)}.{node.attr}")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            strings.add(node.value)
    return attrs, chains, strings


def unread_options(command: str) -> list[str]:
    mods, graph = _modules(), import_graph()
    runner = cli.RUNNERS[command].split(":")[0]
    attrs, chains, strings = set(), set(), set()
    for m in {m for m in _reachable(runner, graph) if m != "drpost.config" and not m.startswith("drpost.config.")}:
        a, c, s = _uses(mods[m])
        attrs |= a
        chains |= c
        strings |= s
    taken_groups = {c.split(".")[1] for c in chains if c.split(".")[0] in ("config", "cfg", "c")}
    taken_groups |= {c.split(".")[1] for c in chains}  # any x.group chain: the group object is handed on
    refused_by_table = REFUSING_RUNNERS.get(command)
    out = []
    for name, _f, _tp in leaf_options(COMMANDS[command]):
        parts = name.split(".")
        if refused_by_table is not None and name not in refused_by_table():
            continue  # refused by the runner's table (test_options_outside_the_read_table_are_refused)
        if name in strings or name in chains:
            continue
        if len(parts) == 1 and parts[0] in attrs:
            continue
        if len(parts) == 2 and parts[0] in taken_groups and parts[1] in attrs:
            continue
        if (command, name) not in EXCEPTIONS:
            out.append(name)
    return out


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_option_is_read(command):
    missing = unread_options(command)
    assert not missing, f"drpost {command}: options shown by --help that no code reads: {missing}"


def _other_value(value, tp):
    """A valid value different from ``value`` for an option of type ``tp``."""
    if typing.get_origin(tp) is typing.Union or type(None) in typing.get_args(tp):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is not None:
            return None
        tp = args[0]
    if typing.get_origin(tp) is typing.Literal:
        return next(c for c in typing.get_args(tp) if c != value)
    if typing.get_origin(tp) in (list, tuple):
        return [] if value else ["x"]
    if tp is bool:
        return not value
    if tp in (int, float):
        return (value or 0) + 1
    return f"{value}-other"


@pytest.mark.parametrize("command, runner_path", [("demo", "drpost.bench.demo"),
                                                   ("bench quality", "drpost.bench.quality")])
def test_options_outside_the_read_table_are_refused(command, runner_path, tmp_path):
    import importlib

    module = importlib.import_module(runner_path)
    cls = COMMANDS[command]
    for name, _f, _tp in leaf_options(cls):
        if name in module.READ:
            continue
        config = cls(output_dir=str(tmp_path))
        obj = config
        parts = name.split(".")
        for p in parts[:-1]:
            obj = getattr(obj, p)
        setattr(obj, parts[-1], _other_value(getattr(obj, parts[-1]), typing.get_type_hints(type(obj))[parts[-1]]))
        with pytest.raises(ConfigError, match=f"'{name}'"):
            module.run(config)


def test_the_read_tables_name_real_options():
    from drpost.bench import demo, quality, rl

    for cls, table in ((C.DemoConfig, demo.READ), (C.BenchConfig, quality.READ), (C.BenchConfig, rl.READ)):
        names = {n for n, _, _ in leaf_options(cls)}
        assert table <= names, table - names


# ---------------------------------------------------------------------------------------------------------- names
def _choices(tp) -> set[str]:
    return set(typing.get_args(tp))


def test_method_name_lists_agree():
    from drpost.bench import quality, rl
    from drpost.feasible import SETS
    from drpost.geometry.kernels import METHODS as SCORING_METHODS

    assert _choices(C.Method) == set(SETS), "config.Method vs feasible.SETS"
    assert _choices(C.Scoring) == {"auto", *SCORING_METHODS}, "config.Scoring vs geometry.kernels.METHODS"
    bench_methods = set(quality.METHODS) | {m for per in rl.METHODS.values() for m in per}
    assert _choices(C.BenchMethod) == bench_methods, "config.BenchMethod vs bench.quality/rl METHODS"
    assert set(quality.DEFAULT_METHODS) <= set(quality.METHODS)
    for paradigm, names in rl.DEFAULT_METHODS.items():
        assert set(names) <= set(rl.METHODS[paradigm]), paradigm
    for field in dataclasses.fields(C.BenchConfig):
        if field.name == "methods":
            assert set(field.default_factory()) == set(quality.DEFAULT_METHODS)
    assert set(_choices(C.BenchConfig.__annotations__.get("paradigm") and
                        typing.get_type_hints(C.BenchConfig)["paradigm"])) == {"sft", *rl.PARADIGMS}


def test_the_static_check_flags_an_option_nobody_reads(monkeypatch):
    @dataclasses.dataclass
    class Probe(C.SFTConfig):
        zz_never_read_option: int = schema._opt(0, "An option no code reads.")

    monkeypatch.setitem(COMMANDS, "sft", Probe)
    assert unread_options("sft") == ["zz_never_read_option"]
