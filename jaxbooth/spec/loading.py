"""Loading a RunSpec from a command line, YAML files or a mapping, and writing it back as YAML.

Precedence, lowest first: field defaults, a script preset (``SCRIPT_PRESETS``), each
``--config`` file in order (each may ``extends:`` a base file), then the other flags. Every
user error is a ``JaxboothError`` naming the key, the value, where it was written
("run.yaml:3") and the fix; a spec that loads but is probably not what the user meant is
logged as a warning on the ``jaxbooth`` logger. Parsing has no side effects (no mkdir, no
downloads, no environment reads).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from jaxbooth import capabilities  # module object only: capabilities imports jaxbooth.spec.schema
from jaxbooth.config_syntax import compose_yaml
from jaxbooth.errors import JaxboothError
from jaxbooth.spec.coercion import Item, coerce, suggest_key
from jaxbooth.spec.command_line import parse_command_line
from jaxbooth.spec.presets import preset_items
from jaxbooth.spec.schema import FIELDS, SECTIONS, RunSpec, build_spec, default_flat
from jaxbooth.spec.validation import validate_spec

logger = logging.getLogger("jaxbooth")


def load_spec(argv: Sequence[str], *, preset: str | None = None) -> RunSpec:
    """Parse a diffusers-style command line (plus ``--config RUN.yaml``) into a validated RunSpec.

    ``argv`` may start with a diffusers script name (``train_dreambooth_lora.py``) whose defaults
    apply; ``preset`` is the script to assume when none is named. Flags take ``--key=value``,
    ``--key value``, bare ``--flag`` for booleans (``--flag=false`` too) and several values for
    list keys (``--validation_images a.png b.png``). ``-h``/``--help`` raises ``HelpRequested``.
    """
    return load_spec_with_keys(argv, preset=preset)[0]


def load_spec_with_keys(argv: Sequence[str], *, preset: str | None = None, prog: str = "jaxbooth train"
                        ) -> tuple[RunSpec, set[str]]:
    """``load_spec`` plus the keys the command line set itself (see ``given_keys``), parsing once."""
    return spec_from_items(command_line_items(argv, preset=preset, prog=prog))


def spec_from_items(items: Sequence[Item]) -> tuple[RunSpec, set[str]]:
    """The validated spec of typed (key, value, where) items over the defaults, later items winning, and the
    keys they set; what a command line and ``jaxbooth.train``'s keyword arguments both come down to."""
    values, sources = default_flat(), {}
    for name, value, where in items:
        values[name], sources[name] = value, where
    return _finish(build_spec(values), sources), set(sources)


def given_keys(argv: Sequence[str]) -> set[str]:
    """The flat keys a command line sets itself (flags, ``--config`` files, a preset), not by default."""
    return {name for name, _, _ in command_line_items(argv)}


def command_line_items(argv: Sequence[str], *, preset: str | None = None, prog: str = "jaxbooth train"
                       ) -> list[Item]:
    """What a command line sets, lowest precedence first: preset, ``--config`` files, flags."""
    parsed = parse_command_line(argv, preset=preset, prog=prog)
    items = preset_items(parsed.preset)
    for path in parsed.config_paths:
        items += _read_yaml_items(path)
    return items + list(parsed.items)


def load_spec_from_dict(d: Mapping[str, Any], *, source: str = "<dict>") -> RunSpec:
    """A validated RunSpec from a mapping that is nested by section, flat, or a mix of both."""
    values, sources = default_flat(), {}
    for name, value, where in _mapping_items(d, source, {}):
        values[name], sources[name] = value, where
    return _finish(build_spec(values), sources)


def _finish(spec: RunSpec, sources: Mapping[str, str]) -> RunSpec:
    """Validate, log warnings, and reject options the explicitly chosen backend lacks, early."""
    for message in validate_spec(spec, sources):
        logger.warning(message)
    if spec.backend != "auto":
        capabilities.check_backend(spec, spec.backend)
    return spec


def _read_yaml_items(path: str, chain: tuple[Path, ...] = ()) -> list[Item]:
    """Typed items from one YAML file, after those of the file it ``extends:`` (relative path)."""
    resolved = Path(path).resolve()
    if resolved in chain:
        raise JaxboothError(f"{path}: 'extends' loops back to itself via {' -> '.join(map(str, chain))}")
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise JaxboothError(f"{path}: config file not found; check the --config path") from None
    except (OSError, UnicodeDecodeError) as error:
        raise JaxboothError(f"{path}: cannot read config file ({error})") from None
    data, lines = _parse_yaml(text, path)
    if not isinstance(data, dict):
        raise JaxboothError(f"{path}: expected a mapping of spec keys at the top level, found "
                            f"{type(data).__name__}; write `key: value` lines or `section:` blocks")
    items: list[Item] = []
    base = data.pop("extends", None)
    if base is not None:
        if not isinstance(base, str):
            raise JaxboothError(f"{path}: extends={base!r} must be a file path")
        items += _read_yaml_items(str(resolved.parent / base), (*chain, resolved))
    return items + _mapping_items(data, path, lines)


def _parse_yaml(text: str, path: str) -> tuple[Any, dict[tuple[str, ...], int]]:
    """(data, line of each key) from YAML text; syntax errors and repeated keys name the line."""
    root, data = compose_yaml(text, path)
    lines: dict[tuple[str, ...], int] = {}
    _collect_key_lines(root, (), lines, path)
    return data, lines


def _collect_key_lines(node: Any, prefix: tuple[str, ...], lines: dict, path: str) -> None:
    if not isinstance(node, yaml.MappingNode) or len(prefix) > 1:
        return
    for key_node, value_node in node.value:
        key = (*prefix, str(key_node.value))
        line = key_node.start_mark.line + 1
        if key in lines:
            raise JaxboothError(f"{path}:{line}: key {'.'.join(key)!r} repeats the one on line "
                                f"{lines[key]}; keep one")
        lines[key] = line
        _collect_key_lines(value_node, key, lines, path)


def _mapping_items(data: Mapping[str, Any], origin: str, lines: Mapping[tuple, int]) -> list[Item]:
    """Typed items from a mapping of sections and/or flat keys; each key may appear once."""
    items: list[Item] = []
    for key, value in data.items():
        key = str(key)
        if key in SECTIONS and not isinstance(value, Mapping) and value is not None:
            raise JaxboothError(f"{_loc(origin, lines, (key,))}: section {key!r} must be a mapping "
                                f"of its keys, found {value!r}")
        if key in SECTIONS:
            items += [_mapping_item(key, str(k), v, origin, lines) for k, v in (value or {}).items()]
        else:
            items.append(_mapping_item(None, key, value, origin, lines))
    seen: dict[str, str] = {}
    for name, _, where in items:
        if name in seen:
            raise JaxboothError(f"{where}: {name} is also set at {seen[name]}; keep one of them")
        seen[name] = where
    return items


def _mapping_item(section: str | None, key: str, value: Any, origin: str, lines: Mapping) -> Item:
    path = (key,) if section is None else (section, key)
    where = f"{_loc(origin, lines, path)}: {'.'.join(path)}"
    info = FIELDS.get(key)
    if info is None:
        pool = None if section is None else [n for n, f in FIELDS.items() if f.section == section]
        hint = suggest_key(key, pool)
        if section is not None and "did you mean" not in hint:
            hint = suggest_key(key)
        raise JaxboothError(f"{where}: unknown key{hint}")
    if section is not None and info.section != section:
        home = f"section {info.section!r}" if info.section else "the top level"
        raise JaxboothError(f"{where}: {key!r} belongs to {home}, not {section!r}; move it there "
                            "(or write it flat, without a section)")
    return key, coerce(info, value, where), where


def _loc(origin: str, lines: Mapping[tuple, int], path: tuple[str, ...]) -> str:
    line = lines.get(path)
    return f"{origin}:{line}" if line else origin


# --------------------------------------------------------------------------- serialization


def spec_to_dict(spec: RunSpec) -> dict[str, Any]:
    """Plain nested dict (``backend`` then one mapping per section); tuples become lists for YAML."""
    out: dict[str, Any] = {"backend": spec.backend}
    for section in SECTIONS:
        values = dataclasses.asdict(getattr(spec, section))
        out[section] = {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
    return out


def without_hub_token(spec_dict: Mapping[str, Any]) -> dict[str, Any]:
    """A ``spec_to_dict`` mapping with the Hub token written as null (a copy; the input is untouched)."""
    out = dict(spec_dict)
    if isinstance(out.get("hub"), Mapping):
        out["hub"] = {**out["hub"], "hub_token": None}
    return out


def shareable_spec_dict(spec: RunSpec) -> dict[str, Any]:
    """``spec_to_dict`` for anything that leaves the process (files, printouts, trackers): no Hub token."""
    return without_hub_token(spec_to_dict(spec))


def write_resolved_spec(spec: RunSpec, path: str | Path) -> Path:
    """Write the full spec as YAML that ``load_spec(["--config", path])`` reads back equal.

    The hub token is left out (written as null): resolved specs land in output dirs and
    checkpoints that get shared. Creates the parent folder; returns the path written.
    """
    data = shareable_spec_dict(spec)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header = "# jaxbooth resolved run spec: every key, defaults included. Reuse with --config.\n"
    path.write_text(header + yaml.safe_dump(data, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path
