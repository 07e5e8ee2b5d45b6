"""Reading a dataset config file (TOML, YAML or JSON) with the line of every key, for error messages.

``read_config(path)`` returns the parsed mapping and ``{location: line}``, where a location is a
tuple of keys and list indices (``("datasets", 0, "subsets", 1, "image_dir")``); tables and list
items have the line where they start. tomllib keeps no positions, so TOML lines come from a small
scanner of table headers and ``key =`` lines (enough for kohya's documented form; a key it cannot
place reports the line of its nearest enclosing table instead).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from jaxbooth.config_syntax import compose_yaml, toml_module
from jaxbooth.errors import JaxboothError

TOML_SUFFIXES = (".toml",)
YAML_SUFFIXES = (".yaml", ".yml", ".json")
_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_NAME = r"""(?:"[^"]*"|'[^']*'|[A-Za-z0-9_\-]+)"""
_KEY = re.compile(rf"^\s*({_NAME}(?:\s*\.\s*{_NAME})*)\s*=(.*)$")
_STRINGS = re.compile(r""""(?:[^"\\]|\\.)*"|'[^']*'""")


def read_config(path: str | Path) -> tuple[dict[str, Any], dict[tuple, int]]:
    """(data, key lines) of a .toml, .yaml/.yml or .json file; a missing file or bad syntax is one error."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (*TOML_SUFFIXES, *YAML_SUFFIXES):
        raise JaxboothError(f"dataset config {path} (--dataset_config): unknown file type {suffix or '(none)'}; "
                            "use a .toml file (kohya's form) or the same structure as .yaml / .json")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise JaxboothError(f"dataset config {path} (--dataset_config) does not exist; check the path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise JaxboothError(f"dataset config {path} (--dataset_config) cannot be read as UTF-8 text ({exc})") from None
    if suffix in TOML_SUFFIXES:
        toml = toml_module(path, "write the same structure as .yaml")
        try:
            data = toml.loads(text)
        except toml.TOMLDecodeError as exc:
            raise JaxboothError(f"{path}: invalid TOML ({exc}); fix the syntax there") from None
        return data, toml_key_lines(text)
    return _read_yaml(text, path)




def key_line(lines: Mapping[tuple, int], loc: tuple) -> int | None:
    """The line of `loc`, else of its nearest enclosing location that has one."""
    for end in range(len(loc), -1, -1):
        if loc[:end] in lines:
            return lines[loc[:end]]
    return None


def _parts(dotted: str) -> tuple[str, ...]:
    return tuple(part.strip().strip("\"'") for part in re.findall(r""""[^"]*"|'[^']*'|[^.]+""", dotted))


def toml_key_lines(text: str) -> dict[tuple, int]:
    """{location: line} of TOML table headers and keys (array-of-tables items get their index)."""
    lines: dict[tuple, int] = {}
    latest: dict[tuple, int] = {}  # array-of-tables name -> index of its current item
    counts: dict[tuple, int] = {}  # (resolved parent, name) -> items so far

    def resolve(parts: tuple[str, ...]) -> tuple:
        out: list = []
        for k in range(len(parts)):
            out.append(parts[k])
            if parts[: k + 1] in latest:
                out.append(latest[parts[: k + 1]])
        return tuple(out)

    table: tuple = ()
    depth, closing = 0, None
    for number, raw in enumerate(text.splitlines(), 1):
        if closing is not None:  # inside a multi-line string
            if closing in raw:
                closing = None
            continue
        if depth > 0:  # inside a multi-line array or inline table
            depth += _bracket_balance(raw)
            continue
        header = _HEADER.match(raw)
        if header is not None:
            parts = _parts(header.group(2))
            if header.group(1) == "[[":
                slot = (resolve(parts[:-1]), parts[-1])
                latest[parts] = counts.get(slot, 0)
                counts[slot] = latest[parts] + 1
            table = resolve(parts)
            lines.setdefault(table, number)
            continue
        key = _KEY.match(raw)
        if key is None:
            continue
        lines.setdefault((*table, *_parts(key.group(1))), number)
        value = key.group(2).strip()
        for quote in ('"""', "'''"):
            if value.startswith(quote) and value.count(quote) == 1:
                closing = quote
        if closing is None:
            depth = max(0, _bracket_balance(value))
    return lines


def _bracket_balance(text: str) -> int:
    text = _STRINGS.sub("", text).split("#", 1)[0]
    return text.count("[") + text.count("{") - text.count("]") - text.count("}")


def _read_yaml(text: str, path: Path) -> tuple[dict[str, Any], dict[tuple, int]]:
    root, data = compose_yaml(text, path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise JaxboothError(f"{path}: a dataset config is a mapping (general:, datasets:), found "
                            f"{type(data).__name__}")
    lines: dict[tuple, int] = {}
    _yaml_lines(root, (), lines, path)
    return data, lines


def _yaml_lines(node: Any, loc: tuple, lines: dict[tuple, int], path: Path) -> None:
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            here = (*loc, str(key_node.value))
            line = key_node.start_mark.line + 1
            if here in lines:
                raise JaxboothError(f"{path}:{line}: key {key_node.value!r} repeats the one on line {lines[here]}; "
                                    "keep one")
            lines[here] = line
            _yaml_lines(value_node, here, lines, path)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            lines[(*loc, index)] = item.start_mark.line + 1
            _yaml_lines(item, (*loc, index), lines, path)
