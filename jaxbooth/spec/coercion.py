"""Typing one raw value (a command-line string or a YAML value) as its spec field, and flat access.

Every conversion error is a ``JaxboothError`` naming the key, the value and an example of a
good one; unknown keys name the closest valid key (``difflib``). Standard library only.
"""

from __future__ import annotations

import difflib
import math
import typing
from collections.abc import Sequence
from typing import Any

from jaxbooth.errors import JaxboothError
from jaxbooth.spec.schema import FIELDS, SECTIONS, FieldInfo, RunSpec, build_spec, strip_optional

# (flat name, typed value, where it came from for messages): what presets, YAML files and flags set.
Item = tuple[str, Any, str]

_TRUE = frozenset({"true", "1", "yes", "on", "y", "t"})
_FALSE = frozenset({"false", "0", "no", "off", "n", "f"})
_NONE_WORDS = frozenset({"none", "null", "~"})


def lookup_field(name: str, where: str) -> FieldInfo:
    """The FieldInfo of ``name`` or an error suggesting the closest valid key."""
    info = FIELDS.get(name)
    if info is None:
        raise JaxboothError(f"{where}: unknown option{suggest_key(name)}")
    return info


def closest(name: str, pool: Sequence[str]) -> str | None:
    """The most similar string in ``pool`` (case-insensitive), or None when nothing is close."""
    lowered = {p.lower(): p for p in pool}
    close = difflib.get_close_matches(name.lower(), list(lowered), n=1, cutoff=0.6)
    return lowered[close[0]] if close else None


def suggest_key(name: str, candidates: Sequence[str] | None = None) -> str:
    """'; did you mean --x (section s)?' for an unknown key, or a pointer to the full list."""
    hit = closest(name, list(candidates if candidates is not None else [*FIELDS, *SECTIONS]))
    if hit is None:
        return "; run `jaxbooth train --help` for the valid keys"
    if hit in SECTIONS:
        return f"; did you mean section {hit!r}?"
    section = FIELDS[hit].section
    return f"; did you mean --{hit}" + (f" (section {section})?" if section else "?")


def coerce(info: FieldInfo, raw: Any, where: str) -> Any:
    """``raw`` (a CLI string or a YAML value) as the field's declared type, or a JaxboothError."""
    inner, optional = strip_optional(info.annotation)
    if raw is None or (optional and isinstance(raw, str) and raw.strip().lower() in _NONE_WORDS
                       and inner is not str and "none" not in (info.choices or ())):
        if optional:
            return None
        raise JaxboothError(f"{where} cannot be empty; expected {_expected(info)}, "
                            f"e.g. --{info.name}={info.default} (its default)")
    try:
        return _convert(inner, raw, info)
    except (TypeError, ValueError):
        if info.choices and isinstance(raw, str):
            hit = closest(raw, info.choices)
            hint = f"; did you mean {hit!r}?" if hit else ""
            raise JaxboothError(f"{where}={raw!r} is not {_expected(info)}{hint}") from None
        example = info.default if info.default is not None else _example(inner)
        example = f"--{info.name}={example}" if where.startswith("--") else f"{info.name}: {example}"
        raise JaxboothError(f"{where}={raw!r} is not {_expected(info)}; use e.g. {example}") from None


def _convert(inner: Any, raw: Any, info: FieldInfo) -> Any:
    """Type conversion proper; raises TypeError/ValueError for _coerce to word."""
    if inner is bool:
        if isinstance(raw, bool):
            return raw
        word = str(raw).strip().lower() if isinstance(raw, str) else None
        if word in _TRUE or word in _FALSE:
            return word in _TRUE
        raise ValueError(raw)
    if inner is int:
        if isinstance(raw, bool):
            raise TypeError(raw)
        if isinstance(raw, int):
            return raw
        value = float(raw) if isinstance(raw, float) else None
        if value is None:
            text = str(raw).strip()
            if text.lstrip("+-").isdigit():
                return int(text)
            value = float(text)  # "1e3" is a fine step count; "4.5" is not
        if not (math.isfinite(value) and value.is_integer()):
            raise ValueError(raw)
        return int(value)
    if inner is float:
        if isinstance(raw, bool):
            raise TypeError(raw)
        value = float(raw)
        if not math.isfinite(value):
            raise ValueError(raw)
        return value
    if typing.get_origin(inner) is tuple:
        items = [raw] if isinstance(raw, (str, int, float)) and not isinstance(raw, bool) else raw
        if not isinstance(items, (list, tuple)) or not items:
            raise TypeError(raw)
        return tuple(_plain_str(x) for x in items)
    text = _plain_str(raw)
    if info.choices is not None:
        return _pick_choice(info, text)
    return text


def _plain_str(raw: Any) -> str:
    """Strings pass; YAML numbers (a revision '2023') become text; booleans and containers fail."""
    if isinstance(raw, str):
        return raw
    if isinstance(raw, (int, float)) and not isinstance(raw, bool):
        return str(raw)
    raise TypeError(raw)


def _pick_choice(info: FieldInfo, text: str) -> str:
    """The canonical spelling of a choice, matched case-insensitively (diffusers' 'AdamW')."""
    for choice in info.choices or ():
        if text.strip().lower() == choice.lower():
            return choice
    raise ValueError(text)


def _expected(info: FieldInfo) -> str:
    inner, optional = strip_optional(info.annotation)
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    text = names.get(inner, "one or more strings" if typing.get_origin(inner) is tuple else "a value")
    if info.choices:
        text = "one of " + ", ".join(info.choices)
    return text + (" (or none)" if optional else "")


def _example(inner: Any) -> str:
    return {bool: "true", int: "1", float: "1.0", str: "VALUE"}.get(inner, "VALUE")


def get_flat(spec: RunSpec, name: str) -> Any:
    """The value of one key by its flat name (``get_flat(spec, "learning_rate")``)."""
    info = lookup_field(name, f"--{name}")
    return spec.backend if info.section is None else getattr(getattr(spec, info.section), name)


def replace_flat(spec: RunSpec, **overrides: Any) -> RunSpec:
    """A copy of ``spec`` with keys replaced by flat name, type-checked like CLI values.

    Only per-key checks run here; call ``validate_spec`` on the result for cross-key rules.
    """
    values = spec.flat()
    for name, raw in overrides.items():
        where = f"replace_flat: {name}"
        values[name] = coerce(lookup_field(name, where), raw, where)
    return build_spec(values)
