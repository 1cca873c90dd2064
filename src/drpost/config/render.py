"""Writing options: ``to_dict``, ``save_resolved`` (``config.yaml`` of a run), ``command_of``, ``help_text`` (the
CLI's ``--help``) and the markdown reference (``python -m drpost.config``)."""

from __future__ import annotations

import dataclasses
import sys
import textwrap
from pathlib import Path
from typing import Any

import yaml

from drpost.config.bench import BENCH_CONFIGS, CONFIGS
from drpost.config.parse import _fields, _format_value, _is_group, _type_name
from drpost.config.schema import GROUPS

# ----------------------------------------------------------------------------------------------------------------
# Output.

def to_dict(config: Any) -> dict:
    """Nested plain dict (lists, not tuples) of a config, in field order; YAML- and JSON-safe."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(config)


def command_of(config_or_cls: Any) -> str | None:
    cls = config_or_cls if isinstance(config_or_cls, type) else type(config_or_cls)
    if cls in BENCH_CONFIGS.values():  # 'drpost bench' needs its kind: 'bench quality', 'bench system', ...
        return f"bench {cls.kind}"
    return next((name for name, c in CONFIGS.items() if c is cls), None)


def save_resolved(config: Any, out_dir: str | Path) -> Path:
    """Write the resolved config to ``out_dir/config.yaml`` (creating the directory); returns the file's path.

    The file re-loads to an equal config: ``drpost <command> --config out_dir/config.yaml``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "config.yaml"
    command = command_of(config) or type(config).__name__
    header = f"# Resolved drpost {command} config. Rerun: drpost {command} --config {path.name}\n"
    path.write_text(header + yaml.safe_dump(to_dict(config), sort_keys=False, default_flow_style=False),
                    encoding="utf-8")
    return path


def _wrap(text: str, indent: str, width: int) -> str:
    return textwrap.fill(text, width=width, initial_indent=indent, subsequent_indent=indent)


def help_text(cls: type, width: int = 110) -> str:
    """Per-option help for ``--help``: name, type, default and help text, grouped as in the dataclass."""
    default = cls()
    lines: list[str] = []
    top, groups = [], []
    for f, tp in _fields(cls):
        (groups if _is_group(tp) else top).append((f, tp))

    def emit(name: str, f: dataclasses.Field, tp: Any, value: Any) -> None:
        lines.append(f"  {name}: {_type_name(tp)} = {_format_value(value)}")
        lines.append(_wrap(f.metadata["help"], " " * 6, width))

    lines.append("options:")
    for f, tp in top:
        emit(f.name, f, tp, getattr(default, f.name))
    for gf, gtp in groups:
        lines.append("")
        lines.append(f"{gf.name}: {gf.metadata['help']}")
        group_value = getattr(default, gf.name)
        for f, tp in _fields(gtp):
            emit(f"{gf.name}.{f.name}", f, tp, getattr(group_value, f.name))
    return "\n".join(lines)


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _md_table(rows: list[tuple[str, Any, Any, dataclasses.Field]]) -> list[str]:
    out = ["| option | type | default | help |", "|---|---|---|---|"]
    for name, tp, value, f in rows:
        out.append(f"| `{name}` | {_md_cell(_type_name(tp))} | `{_md_cell(_format_value(value))}` "
                   f"| {_md_cell(f.metadata['help'])} |")
    return out


def config_reference_markdown() -> str:
    """The markdown reference of every command's options (docs/configuration.md)."""
    lines = [
        "# Configuration reference",
        "",
        "Generated from the dataclasses in `src/drpost/config/schema.py` and `bench.py` by `python -m drpost.config`; do not edit by hand.",
        "",
        "Every subcommand (`drpost demo|sft|dpo|rlhf|rlvr|bench`) takes its options from, in increasing precedence:",
        "the defaults below, YAML files given with `--config file.yaml` (overrides only, nested by group, applied in",
        "order), then command-line overrides `group.key=value`, `--group.key value` or `--group.key=value`.",
        "Lists are comma-separated (`seeds=0,1,2`); `none` / `null` sets an optional value to none; booleans accept",
        "true/false/yes/no/on/off/1/0, and a bare `--flag` means true. Unknown options are rejected with the closest",
        "valid name. Every run writes the resolved `config.yaml` into its `output_dir`.",
        "",
        "Example:",
        "",
        "```",
        "drpost sft --config my.yaml regularizer.method=hull optim.lr=1e-4 --data.max_seq_length 512",
        "```",
        "",
        "## Shared option groups",
        "",
    ]
    for group in GROUPS:
        names = [f.name for cls in CONFIGS.values() for f, tp in _fields(cls) if tp is group]
        prefix = names[0] if names else group.__name__
        lines += [f"### `{prefix}.*` ({group.__name__})", "", (group.__doc__ or "").strip(), ""]
        inst = group()
        lines += _md_table([(f"{prefix}.{f.name}", tp, getattr(inst, f.name), f) for f, tp in _fields(group)])
        lines.append("")
    lines += ["## Commands", ""]
    for command, cls in [*CONFIGS.items(), *((f"bench {k}", c) for k, c in BENCH_CONFIGS.items() if k != "quality")]:
        inst = cls()
        lines += [f"### `drpost {command}` ({cls.__name__})", "", " ".join((cls.__doc__ or "").split()), ""]
        allowed = getattr(cls, "allowed_formats", None)
        if allowed:
            lines += [f"Data formats: {', '.join(allowed)}.", ""]
        top = [(f.name, tp, getattr(inst, f.name), f) for f, tp in _fields(cls) if not _is_group(tp)]
        lines += _md_table(top)
        lines.append("")
        for gf, gtp in _fields(cls):
            if not _is_group(gtp):
                continue
            value = getattr(inst, gf.name)
            if gtp in GROUPS:
                base = gtp()
                changed = [(f"{gf.name}.{f.name}", getattr(value, f.name)) for f, _ in _fields(gtp)
                           if getattr(value, f.name) != getattr(base, f.name)]
                if changed:
                    lines.append(f"Defaults that differ from the shared `{gf.name}.*` group: "
                                 + ", ".join(f"`{n}={_format_value(v)}`" for n, v in changed) + ".")
                    lines.append("")
            else:
                lines += [f"#### `{gf.name}.*` ({gtp.__name__})", "", (gtp.__doc__ or "").strip(), ""]
                lines += _md_table([(f"{gf.name}.{f.name}", tp, getattr(value, f.name), f)
                                    for f, tp in _fields(gtp)])
                lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    """``python -m drpost.config [PATH] [--check]``: write (or check) the markdown reference."""
    args = list(sys.argv[1:] if argv is None else argv)
    check = "--check" in args
    paths = [a for a in args if a != "--check"]
    path = Path(paths[0] if paths else "docs/configuration.md")
    text = config_reference_markdown()
    if check:
        current = path.read_text(encoding="utf-8") if path.exists() else ""
        if current != text:
            print(f"{path} is out of date: run python -m drpost.config", file=sys.stderr)
            return 1
        print(f"{path} is up to date")
        return 0
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    print(f"wrote {path}")
    return 0

