"""The config schema's type machinery: coercing YAML and command-line values to a field's type
(`int | None`, `list[float]`, `Literal[...]`, ...), range checks from the field's metadata, the
description of a type for error messages, the closest valid key for a typo, and durations. No dtrain imports.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from typing import Any, Literal

import yaml

from dtrain.errors import ConfigError


class OverrideValue(str):
    """A command-line value: a string, parsed as YAML when the schema wants another type."""


def closest(key: str, options: list[str]) -> str | None:
    """The valid key the user most likely meant ('rnak' -> 'r', 'trainig' -> 'training')."""
    close = difflib.get_close_matches(key, options, n=1)
    if close:
        return close[0]
    prefixed = [o for o in options if key.startswith(o) or o.startswith(key)]
    if prefixed:
        return max(prefixed, key=len)
    close = difflib.get_close_matches(key, options, n=1, cutoff=0.4)
    return close[0] if close else None


def check(value: Any, t: Any, f: dataclasses.Field, key: str, source: str) -> Any:
    value = _coerce(value, t)
    if not _matches(value, t):
        raise ConfigError(f"{source}: {key} = {value!r}: expected {describe(t)}")
    m = f.metadata
    if isinstance(value, list) and "length" in m and len(value) != m["length"]:
        raise ConfigError(f"{source}: {key} = {value!r}: expected {m['length']} values")
    for v in value if isinstance(value, list) else [value]:
        bad = _range_error(v, m)
        if bad:
            raise ConfigError(f"{source}: {key} = {value!r} is out of range: must be {bad}")
    return value


def _range_error(value: Any, m: Any) -> str | None:
    """What the number must be, when it breaks the field's range (min, gt, lo, hi_open)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    if any(k in m for k in ("min", "gt", "lo", "hi_open")) and not math.isfinite(value):
        return "a finite number"
    if "min" in m and value < m["min"]:
        return f">= {m['min']}"
    if "gt" in m and value <= m["gt"]:
        return f"> {m['gt']}"
    if "lo" in m and value < m["lo"]:
        return f">= {m['lo']}" + (f" and < {m['hi_open']}" if "hi_open" in m else "")
    if "hi_open" in m and value >= m["hi_open"]:
        return f"in [{m.get('lo', 0)}, {m['hi_open']})"
    return None


def _coerce(value: Any, t: Any) -> Any:
    """Parse command-line strings as YAML scalars; accept ints where floats are expected."""
    if isinstance(value, dict):  # a free-form mapping (model.arch): its overridden leaves as YAML
        return {k: _parse_leaves(v) for k, v in value.items()}
    if isinstance(value, OverrideValue):
        raw = str(value)
        try:
            parsed = yaml.safe_load(raw)
        except yaml.YAMLError:
            parsed = raw
        value = parsed if _matches(parsed, t) or not _matches(raw, t) else raw
    if isinstance(value, str) and _wants_float(t):
        try:
            return float(value)  # YAML 1.1 reads '1e-2' as a string
        except ValueError:
            return value
    if isinstance(value, int) and not isinstance(value, bool) and _wants_float(t):
        return float(value)
    if isinstance(value, list) and _wants_float_list(t):
        return [float(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in value]
    return value


def _parse_leaves(value: Any) -> Any:
    """`model.arch.hidden_size=32` inside a free-form mapping: parse the value as YAML."""
    if isinstance(value, dict):
        return {k: _parse_leaves(v) for k, v in value.items()}
    if isinstance(value, OverrideValue):
        try:
            return yaml.safe_load(str(value))
        except yaml.YAMLError:
            return str(value)
    return value


def _options(t: Any) -> tuple:
    origin = typing.get_origin(t)
    if origin in (typing.Union, types.UnionType):
        return typing.get_args(t)
    return (t,)


def _wants_float(t: Any) -> bool:
    return float in _options(t)


def _wants_float_list(t: Any) -> bool:
    return any(typing.get_origin(o) is list and typing.get_args(o) == (float,) for o in _options(t))


def _matches(value: Any, t: Any) -> bool:
    for o in _options(t):
        origin = typing.get_origin(o)
        if o is type(None) and value is None:
            return True
        if origin is Literal and value in typing.get_args(o) and type(value) is not bool:
            return True
        if origin is list and isinstance(value, list):
            (item,) = typing.get_args(o)
            if all(_matches(v, item) for v in value):
                return True
        if o is bool and isinstance(value, bool):
            return True
        if o in (int, float, str, dict) and isinstance(value, o) and not isinstance(value, bool):
            return True
    return False


def describe(t: Any) -> str:
    parts = []
    for o in _options(t):
        origin = typing.get_origin(o)
        if o is type(None):
            parts.append("null")
        elif origin is Literal:
            parts.append("one of " + ", ".join(repr(a) for a in typing.get_args(o)))
        elif origin is list:
            parts.append(f"a list of {typing.get_args(o)[0].__name__}")
        else:
            parts.append({"dict": "a mapping", "int": "an integer"}.get(o.__name__, f"a {o.__name__}"))
    return " or ".join(parts)


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str, key: str = "training.time_limit") -> float:
    """Seconds of '90s', '45m', '2h', '1d', '3600', 'HH:MM:SS', 'MM:SS' or SLURM's 'D-HH:MM:SS'."""
    s = str(text).strip().lower()
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhd]?)", s)
    if m:
        return float(m.group(1)) * _UNITS[m.group(2) or "s"]
    m = re.fullmatch(r"(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+)", s)
    if m:
        d, h, mi, sec = (int(g) if g else 0 for g in m.groups())
        return float(((d * 24 + h) * 60 + mi) * 60 + sec)
    raise ConfigError(f"{key} = '{text}': not a duration (e.g. 90m, 2h, 3600s, 01:30:00, 1-00:00:00)")
