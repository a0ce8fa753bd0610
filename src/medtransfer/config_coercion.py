"""YAML → dataclasses, generically: a strict YAML reader and a builder that checks every key and type.

Nothing here knows the project's schema: `build_dataclass(schema, data, key, where)` fills any frozen dataclass
from a parsed mapping, raising `ConfigError` that names the file and the dotted key of the first unknown key,
missing value or wrong type. The schema lives in `config`, the rules that types cannot express in `config_rules`.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from medtransfer.config_yaml import StrictLoader
from medtransfer.errors import ConfigError


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    """Parse a YAML file that must hold a mapping; duplicate keys, alias bombs and deep nesting are errors (see
    `config_yaml`)."""
    if not path.is_file():
        raise ConfigError("params file not found", where=str(path), fix="create it, or pick a profile with 'medtransfer profile use demo'")
    try:
        with path.open(encoding="utf-8") as handle:
            data = yaml.load(handle, Loader=StrictLoader)  # noqa: S506 - a bounded SafeLoader subclass
    except ConfigError as error:
        raise ConfigError(error.what, where=str(path), fix=error.fix) from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"not valid YAML{line}: {problem}", where=str(path), fix="fix the YAML syntax") from None
    except UnicodeDecodeError:
        raise ConfigError("not a UTF-8 text file", where=str(path), fix="save it as UTF-8 YAML") from None
    except OSError as error:
        raise ConfigError(f"cannot read it ({(error.strerror or str(error)).lower()})", where=str(path),
                          fix="make it readable by the user running medtransfer") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"expected a mapping at the top, got {describe(data)}", where=str(path))
    return data


def named_entries(raw: dict[str, Any], section: str, where: str) -> dict[str, Any]:
    entries = raw.get(section) or {}
    if not isinstance(entries, dict):
        raise ConfigError(f"expected a mapping of names, got {describe(entries)}", where=f"{where}: {section}")
    for name in entries:
        if not isinstance(name, str) or not name or not is_safe_name(name):
            raise ConfigError(
                f"name {name!r} is not usable",
                where=f"{where}: {section}",
                fix="use letters, digits, '-' and '_' only (it becomes part of file and model names)",
            )
    return entries


def is_safe_name(name: str) -> bool:
    return all(ch.isalnum() or ch in "-_" for ch in name) and not name.startswith("-")


def describe(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    text = repr(value)
    if len(text) > 40:
        text = text[:37] + "..."
    return f"{type(value).__name__} {text}"


def build_dataclass(schema: type, data: Any, key: str, where: str) -> Any:
    """Instantiate dataclass `schema` from `data`, checking every key and type."""
    if not isinstance(data, dict):
        raise ConfigError(f"expected a mapping, got {describe(data)}", where=f"{where}: {key}")
    hints = typing.get_type_hints(schema)
    fields = {f.name: f for f in dataclasses.fields(schema) if f.init}
    unknown = sorted(set(map(str, data)) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown key '{unknown[0]}'",
            where=f"{where}: {key}.{unknown[0]}",
            fix=f"known keys here: {', '.join(fields)}",
        )
    values = {}
    for name, spec in fields.items():
        dotted = f"{key}.{name}"
        if name in data:
            values[name] = coerce(hints[name], data[name], dotted, where)
        elif spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key '{name}'", where=f"{where}: {dotted}", fix=f"add '{name}:' under '{key}'")
    return schema(**values)


def coerce(expected: Any, value: Any, key: str, where: str) -> Any:
    origin = typing.get_origin(expected)
    args = typing.get_args(expected)
    location = f"{where}: {key}"
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [arg for arg in args if arg is not type(None)]
        if len(options) == 1:
            return coerce(options[0], value, key, where)
        raise TypeError(f"unsupported union in schema at {key}")  # pragma: no cover - schema bug
    if origin is Literal:
        if isinstance(value, bool) or value not in args:  # True == 1 in Python; a flag is never a choice here
            choices = ", ".join(repr(arg) for arg in args)
            raise ConfigError(f"expected one of {choices}, got {describe(value)}", where=location)
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"expected a list, got {describe(value)}", where=location)
        return [coerce(args[0], item, f"{key}[{index}]", where) for index, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"expected a mapping, got {describe(value)}", where=location)
        # YAML reads `4: malignant` with an integer key; raw labels are compared as text.
        return {
            coerce(args[0], str(name) if isinstance(name, int) and args[0] is str else name, f"{key}.{name}", where):
            coerce(args[1], item, f"{key}.{name}", where)
            for name, item in value.items()
        }
    if dataclasses.is_dataclass(expected):
        return build_dataclass(expected, value, key, where)
    if expected is Any:
        _check_finite(value, key, where)
        return value
    if expected is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"expected true or false, got {describe(value)}", where=location)
        return value
    if expected is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"expected an integer, got {describe(value)}", where=location)
        return value
    if expected is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"expected a number, got {describe(value)}", where=location)
        _check_finite(value, key, where)
        return float(value)
    if expected is str:
        if not isinstance(value, str):
            raise ConfigError(f"expected a string, got {describe(value)}", where=location)
        return value
    raise TypeError(f"unsupported type {expected!r} in schema at {key}")  # pragma: no cover - schema bug


def _check_finite(value: Any, key: str, where: str) -> None:
    """YAML reads .nan and .inf as floats, which pass every `<` comparison rule; no setting means them, so refuse
    them wherever they sit, free-form values (`model_args`) included. The walk is bounded by `config_yaml`."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"expected a finite number, got {value}", where=f"{where}: {key}",
                          fix="write a plain number (.nan and .inf are not settings)")
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for name, item in items:
        _check_finite(item, f"{key}.{name}" if isinstance(value, dict) else f"{key}[{name}]", where)
