"""Typed configuration: dataclasses loaded from YAML (safe loading) with `key.sub=value` overrides.

Validation happens at load, before any work: an unknown key, a value of the wrong type or
one outside its allowed range raises :class:`ConfigError` naming the key, the value and what
is allowed. Range constraints are declared on the dataclass field:

    lr: float = field(default=1e-6, metadata={"min": 0.0, "min_exclusive": True, "help": "..."})
    mode: str = field(default="a", metadata={"choices": ("a", "b")})
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from tether.errors import TetherError


class ConfigError(TetherError, ValueError):
    """A configuration value is unknown, mistyped or out of range."""


T = TypeVar("T")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (list, tuple):
        return f"list of {_type_name(typing.get_args(tp)[0])}" if typing.get_args(tp) else "list"
    if origin is dict:
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotation ``tp`` (with YAML-friendly coercions)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(key, value, arg)
            except ConfigError as err:
                errors.append(str(err))
        if len(errors) == 1:  # Optional[X]: X's own message says what is wrong
            raise ConfigError(errors[0])
        raise ConfigError(f"{key}: {value!r} is not a valid {_type_name(tp)}")
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(
                f"{key}: {value!r} is not allowed; choose one of {', '.join(repr(a) for a in allowed)}"
            )
        return value
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (inner,) = typing.get_args(tp)[:1] or (Any,)
        items = [_coerce(f"{key}[{i}]", v, inner) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a section (mapping) for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        number: float | None = None
        if isinstance(value, int | float):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is None:
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(number):  # NaN passes every range check, and inf is never meant
            raise ConfigError(f"{key}: {value!r} is not a finite number; give a finite value")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    return value


def check_value(key: str, value: Any, tp: Any) -> Any:
    """``value`` checked against the annotation ``tp`` as config values are (YAML-friendly
    coercions, finite numbers); a :class:`ConfigError` naming ``key`` otherwise."""
    return _coerce(key, value, tp)


def _check_range(key: str, value: Any, meta: Mapping[str, Any]) -> None:
    if value is None:
        return
    if "choices" in meta and value not in meta["choices"]:
        choices = ", ".join(repr(c) for c in meta["choices"])
        raise ConfigError(f"{key}: {value!r} is not allowed; choose one of {choices}")
    if "min" in meta:
        lo = meta["min"]
        bad = value <= lo if meta.get("min_exclusive") else value < lo
        if bad:
            op = ">" if meta.get("min_exclusive") else ">="
            raise ConfigError(f"{key}: {value!r} is out of range; it must be {op} {lo}")
    if "max" in meta:
        hi = meta["max"]
        bad = value >= hi if meta.get("max_exclusive") else value > hi
        if bad:
            op = "<" if meta.get("max_exclusive") else "<="
            raise ConfigError(f"{key}: {value!r} is out of range; it must be {op} {hi}")


def from_dict(cls: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """Build dataclass ``cls`` from a mapping, validating every key."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = [k for k in data if k not in fields]
    if unknown:
        import difflib

        key = unknown[0]
        close = difflib.get_close_matches(str(key), list(fields), n=1)
        hint = f" Did you mean '{prefix}{close[0]}'?" if close else ""
        value = data[key]
        if not close and isinstance(value, Mapping) and value:
            # a section of another command (tether sft train.lr=...): the same setting here
            leaf = str(next(iter(value)))
            homes = [
                name
                for name, tp in hints.items()
                if isinstance(tp, type)
                and dataclasses.is_dataclass(tp)
                and leaf in {f.name for f in dataclasses.fields(tp)}
            ]
            if homes:
                hint = f" Did you mean '{prefix}{homes[0]}.{leaf}'?"
        raise ConfigError(
            f"unknown config key '{prefix}{key}'.{hint} Known keys here: {', '.join(prefix + f for f in fields)}"
        )
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        f = fields[name]
        coerced = _coerce(prefix + name, value, hints[name])
        _check_range(prefix + name, coerced, f.metadata)
        kwargs[name] = coerced
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def to_dict(obj: Any) -> Any:
    """Plain, YAML/JSON-serialisable dict of a (nested) dataclass config."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple | list):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys of a nested settings mapping and their values (an empty section is a value)."""
    if isinstance(data, Mapping) and data:
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): data}


def setting_changes(
    before: Mapping[str, Any], after: Mapping[str, Any], missing: str
) -> list[tuple[str, Any, Any]]:
    """``(key, before, after)`` for every key of two flattened settings whose values differ, in key
    order; a key on one side only shows ``missing`` on the other."""
    return [
        (key, before.get(key, missing), after.get(key, missing))
        for key in sorted(before.keys() | after.keys())
        if before.get(key, missing) != after.get(key, missing)
    ]


def key_under(key: str, sections: Collection[str]) -> bool:
    """Whether dotted ``key`` is one of ``sections`` or lies inside one (``train.lr`` in ``train``)."""
    return any(key == s or key.startswith(s + ".") for s in sections)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=value`` -> (["a", "b"], parsed value). Values are parsed as YAML scalars."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.sub=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r}: empty key; write it like trainer.lr=1e-5")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides to a nested dict (a copy)."""
    import copy

    out = copy.deepcopy(data)
    for text in overrides:
        path, value = parse_override(text)
        node = out
        for part in path[:-1]:
            nxt = node.get(part)
            if nxt is None:
                nxt = {}
                node[part] = nxt
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {text!r}: {part!r} is a value, not a section")
            node = nxt
        node[path[-1]] = value
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping at the top level")
    return data


def load(cls: type[T], base: Mapping[str, Any] | None = None, overrides: Sequence[str] = ()) -> T:
    """Validated config from a base mapping plus command-line overrides."""
    return from_dict(cls, apply_overrides(dict(base or {}), overrides))
