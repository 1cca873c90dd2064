"""Reading options: introspection of the schema, coercion of values from their annotations, checks, YAML files and
command-line overrides (``parse_config``), cross-option rules (``validate``) and ``refuse_unread``."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from drpost.config.schema import _FALSE_WORDS, _NONE_WORDS, _TRUE_WORDS, ConfigError

# ----------------------------------------------------------------------------------------------------------------
# Introspection.

@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _fields(cls: type) -> list[tuple[dataclasses.Field, Any]]:
    hints = _hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls)]


def _is_group(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def leaf_options(cls: type, prefix: str = "") -> list[tuple[str, dataclasses.Field, Any]]:
    """All settable options of a config class as (dotted name, field, type), groups flattened in field order."""
    out = []
    for f, tp in _fields(cls):
        if _is_group(tp):
            out.extend(leaf_options(tp, prefix + f.name + "."))
        else:
            out.append((prefix + f.name, f, tp))
    return out


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "none"
    if _is_union(tp):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "{" + ",".join(str(a) for a in typing.get_args(tp)) + "}"
    if origin in (list, tuple):
        args = typing.get_args(tp)
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            return "tuple[" + ", ".join(_type_name(a) for a in args) + "]"
        return f"list[{_type_name(args[0])}]"
    return getattr(tp, "__name__", str(tp))


def _describe(tp: Any) -> str:
    """Human wording of what a type accepts, for error messages."""
    if tp is type(None):
        return "none"
    if _is_union(tp):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        args = typing.get_args(tp)
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            return f"{len(args)} comma-separated values"
        return "a comma-separated list"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _literal_choices(tp: Any) -> list[str]:
    if _is_union(tp):
        return [c for a in typing.get_args(tp) for c in _literal_choices(a)]
    if typing.get_origin(tp) is Literal:
        return [str(a) for a in typing.get_args(tp)]
    return []


def _item_type(tp: Any) -> Any:
    """The element type of a list/tuple annotation (through ``| None``), else ``tp`` itself."""
    for a in (typing.get_args(tp) if _is_union(tp) else (tp,)):
        if typing.get_origin(a) in (list, tuple):
            return typing.get_args(a)[0]
    return tp


def _format_value(v: Any) -> str:
    if v is None:
        return "none"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return ",".join(_format_value(x) for x in v)
    return str(v)


# ----------------------------------------------------------------------------------------------------------------
# Coercion and checks.

class _Mismatch(Exception):
    """Internal: a value does not fit a type (message says what was expected)."""


def _coerce(value: Any, tp: Any) -> Any:
    """Convert a YAML or command-line value to the annotated type, or raise _Mismatch."""
    if tp is Any:
        return value
    if _is_union(tp):
        args = typing.get_args(tp)
        if type(None) in args and (value is None or (isinstance(value, str) and value.strip().lower() in _NONE_WORDS)):
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a)
            except _Mismatch:
                continue
        raise _Mismatch(f"expected {_describe(tp)}, got {value!r}")
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, str) and value.strip() in choices:
            return value.strip()
        raise _Mismatch(f"expected {_describe(tp)}, got {value!r}")
    if origin in (list, tuple):
        args = typing.get_args(tp)
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                try:
                    value = yaml.safe_load(text)
                except yaml.YAMLError as e:
                    raise _Mismatch(f"could not read {value!r} as a list: {e}") from None
            else:
                value = [p.strip() for p in text.split(",")] if text else []
        if not isinstance(value, (list, tuple)):
            raise _Mismatch(f"expected {_describe(tp)}, got {value!r}")
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):
                raise _Mismatch(f"expected {len(args)} values, got {len(value)} ({value!r})")
            return tuple(_coerce(v, a) for v, a in zip(value, args))
        out = [_coerce(v, args[0]) for v in value]
        return tuple(out) if origin is tuple else out
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.strip().lower() in _TRUE_WORDS + _FALSE_WORDS:
            return value.strip().lower() in _TRUE_WORDS
        raise _Mismatch(f"expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise _Mismatch(f"expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            text = value.strip().replace("_", "")
            try:
                return int(text)
            except ValueError:
                try:
                    f = float(text)
                except ValueError:
                    f = math.nan
                if math.isfinite(f) and f.is_integer():
                    return int(f)
        raise _Mismatch(f"expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise _Mismatch(f"expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            out = float(value)
        elif isinstance(value, str):
            try:
                out = float(value.strip())
            except ValueError:
                raise _Mismatch(f"expected a number, got {value!r}") from None
        else:
            raise _Mismatch(f"expected a number, got {value!r}")
        if not math.isfinite(out):
            raise _Mismatch(f"expected a finite number, got {value!r}")
        return out
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise _Mismatch(f"expected a string, got {value!r}")
    raise _Mismatch(f"unsupported option type {tp!r}")


def _check(value: Any, meta: Any) -> str | None:
    """Range / choice / pattern checks from field metadata; returns a problem or None."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        for v in value:
            problem = _check(v, meta)
            if problem:
                return problem
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "min" in meta and value < meta["min"]:
            return f"{value!r} is out of range: must be >= {meta['min']}"
        if "gt" in meta and value <= meta["gt"]:
            return f"{value!r} is out of range: must be > {meta['gt']}"
        if "max" in meta and value > meta["max"]:
            return f"{value!r} is out of range: must be <= {meta['max']}"
    if isinstance(value, str):
        if "choices" in meta and value not in meta["choices"]:
            return f"{value!r} is not one of {', '.join(map(repr, meta['choices']))}"
        if "pattern" in meta and not re.fullmatch(meta["pattern"], value):
            return f"{value!r} does not match the pattern {meta['pattern']}"
    return None


def _coerce_option(value: Any, tp: Any, f: dataclasses.Field, name: str, origin: str) -> Any:
    try:
        out = _coerce(value, tp)
    except _Mismatch as e:
        msg = f"option '{name}': {e}"
        choices = _literal_choices(_item_type(tp))
        items = [v.strip() for v in value.split(",")] if isinstance(value, str) else \
            [str(v) for v in value] if isinstance(value, (list, tuple)) else []
        bad = [v for v in items if v not in choices]  # a list's unknown item is matched on its own
        close = difflib.get_close_matches(bad[0], choices, n=1, cutoff=0.5) if bad and choices else []
        if close:
            msg += f"; did you mean '{close[0]}'" + (f" for {bad[0]!r}" if len(items) > 1 else "") + "?"
        raise ConfigError(f"{msg} (from {origin})") from None
    problem = _check(out, f.metadata)
    if problem:
        raise ConfigError(f"option '{name}': {problem} (from {origin})")
    return out


def _unknown(root: type, name: str, origin: str) -> ConfigError:
    options = [n for n, _, _ in leaf_options(root)]
    leaf = name.rsplit(".", 1)[-1]
    same_leaf = [n for n in options if n.rsplit(".", 1)[-1] == leaf]
    close = same_leaf or difflib.get_close_matches(name, options, n=1, cutoff=0.6) \
        or [n for n in options if n.rsplit(".", 1)[-1] in difflib.get_close_matches(
            leaf, [o.rsplit(".", 1)[-1] for o in options], n=1, cutoff=0.6)]
    hint = f"; did you mean '{close[0]}'?" if close else f"; run with --help to list the options of {root.__name__}"
    return ConfigError(f"unknown option '{name}' (from {origin}){hint}")


def _set(config: Any, name: str, value: Any, origin: str) -> None:
    """Set one dotted option on a config instance (a mapping value sets a group's fields)."""
    name = name.strip().replace("-", "_")
    parts = name.split(".")
    obj = config
    for i, part in enumerate(parts):
        by_name = {f.name: (f, tp) for f, tp in _fields(type(obj))}
        if part not in by_name:
            raise _unknown(type(config), name, origin)
        f, tp = by_name[part]
        if i < len(parts) - 1:
            if not _is_group(tp):
                raise _unknown(type(config), name, origin)
            obj = getattr(obj, part)
            continue
        if _is_group(tp):
            if isinstance(value, dict):
                for k, v in value.items():
                    _set(config, f"{name}.{k}", v, origin)
                return
            first = dataclasses.fields(tp)[0].name
            short = getattr(tp, "shorthand", None)  # a group may take one plain value: '--model X'
            if short and isinstance(value, str):
                _set(config, f"{name}.{short}", value, origin)
                return
            raise ConfigError(f"option '{name}' is a group of options, not a value (from {origin}); set one of its "
                              f"fields, e.g. {name}.{first}=...")
        setattr(obj, part, _coerce_option(value, tp, f, name, origin))


def refuse_unread(config: Any, read: set[str] | frozenset[str], command: str) -> None:
    """ConfigError naming every option of ``config`` that differs from its class default and is not in ``read``.

    For runners that take a shared config class but use only part of it: an option shown by ``--help`` then either
    changes the run or is refused by name.
    """
    default = type(config)()
    changed = []
    for name, _f, _tp in leaf_options(type(config)):
        a, b = config, default
        for part in name.split("."):
            a, b = getattr(a, part), getattr(b, part)
        if a != b and name not in read:
            changed.append(name)
    if changed:
        names = ", ".join(f"'{n}'" for n in changed)
        raise ConfigError(f"option{'s' if len(changed) > 1 else ''} {names} {'are' if len(changed) > 1 else 'is'} "
                          f"not used by drpost {command}; it reads only: {', '.join(sorted(read))}")


# ----------------------------------------------------------------------------------------------------------------
# Cross-field rules: (description, predicate on the config -> problem or None). Explicit list, run by validate().

def _rule_ball_radius(c: Any) -> str | None:
    reg = getattr(c, "regularizer", None)
    if reg is not None and reg.method == "ball" and reg.radius is None:
        return "regularizer.method=ball needs regularizer.radius (a number or 'auto')"
    return None


def _rule_format(c: Any) -> str | None:
    data = getattr(c, "data", None)
    allowed = getattr(type(c), "allowed_formats", None)
    if data is not None and allowed and data.format not in allowed:
        return f"data.format={data.format!r} is not usable by this command; expected one of {', '.join(allowed)}"
    return None


_RULES = [_rule_ball_radius, _rule_format]


def validate(config: Any) -> Any:
    """Re-check every option's type and range, then the cross-field rules; returns the config.

    ``parse_config`` calls it; call it yourself after building or editing a config in Python.
    """
    for name, f, tp in leaf_options(type(config)):
        obj = config
        parts = name.split(".")
        for part in parts[:-1]:
            obj = getattr(obj, part)
        setattr(obj, parts[-1], _coerce_option(getattr(obj, parts[-1]), tp, f, name, "the config object"))
    for rule in _RULES:
        problem = rule(config)
        if problem:
            raise ConfigError(problem)
    return config


# ----------------------------------------------------------------------------------------------------------------
# Parsing.

def load_yaml(path: str | Path) -> dict:
    """Read a YAML file of overrides with ``yaml.safe_load`` (never executes code); {} for an empty file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 text: {e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise ConfigError(f"{where}: invalid YAML: {getattr(e, 'problem', None) or e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must hold a mapping of options, got {type(data).__name__}")
    return data


def _split_argv(cls: type, argv: list[str]) -> tuple[list[str], list[tuple[str, Any]]]:
    """Separate ``--config`` files from (key, value) overrides."""
    bool_options = {n for n, _, tp in leaf_options(cls) if tp is bool}
    files: list[str] = []
    overrides: list[tuple[str, Any]] = []
    i = 0
    while i < len(argv):
        tok = argv[i]
        if tok in ("--config", "-c"):
            if i + 1 >= len(argv):
                raise ConfigError(f"{tok} needs a YAML file")
            files.append(argv[i + 1])
            i += 2
            continue
        if tok.startswith("--config="):
            files.append(tok.split("=", 1)[1])
        elif tok.startswith("--"):
            body = tok[2:]
            if "=" in body:
                key, value = body.split("=", 1)
                overrides.append((key, value))
            else:
                key = body.replace("-", "_")
                nxt = argv[i + 1] if i + 1 < len(argv) else None
                is_bool = key in bool_options
                if nxt is not None and not nxt.startswith("--") and \
                        (not is_bool or nxt.strip().lower() in _TRUE_WORDS + _FALSE_WORDS):
                    overrides.append((body, nxt))
                    i += 1
                elif is_bool:
                    overrides.append((body, True))
                else:
                    known = {n for n, _, _ in leaf_options(cls)}
                    if key not in known:
                        raise _unknown(cls, key, "the command line")
                    raise ConfigError(f"option '{key}' needs a value: --{key} VALUE or {key}=VALUE")
        elif "=" in tok and not tok.startswith("-"):
            key, value = tok.split("=", 1)
            overrides.append((key, value))
        else:
            raise ConfigError(f"unexpected argument {tok!r}: give options as key=value, --key value, --key=value, "
                              f"or --config file.yaml")
        i += 1
    return files, overrides


def parse_config(cls: type, argv: list[str] | tuple[str, ...] = ()) -> Any:
    """Build a validated ``cls`` instance from defaults, YAML files and command-line overrides.

    Precedence: dataclass defaults < every ``--config`` file, in order < command-line overrides, in order.
    Raises ConfigError for unknown keys (with the closest valid name), bad types, out-of-range values.
    """
    files, overrides = _split_argv(cls, list(argv))
    config = cls()
    for path in files:
        for key, value in load_yaml(path).items():
            if not isinstance(key, str):
                raise ConfigError(f"{path}: option names must be strings, got {key!r}")
            _set(config, key, value, origin=str(path))
    for key, value in overrides:
        _set(config, key, value, origin="the command line")
    return validate(config)
