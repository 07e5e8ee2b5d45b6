"""Reading TOML and YAML text: the parts every config reader shares (run specs, kohya dataset configs,
sample prompt files), so a syntax error reads the same everywhere. Standard library and PyYAML only."""

from __future__ import annotations

from typing import Any

import yaml

from jaxbooth.errors import JaxboothError


def toml_module(path: Any, alternative: str) -> Any:
    """tomllib (Python 3.11+), else its backport tomli; without either, an error naming ``path`` and the
    ``alternative`` to TOML."""
    try:
        import tomllib
    except ImportError:
        try:
            import tomli as tomllib
        except ImportError:
            raise JaxboothError(f"{path}: reading a TOML file needs Python 3.11+ or the tomli package "
                                f"(pip install tomli); or {alternative}") from None
    return tomllib


def compose_yaml(text: str, path: Any) -> tuple[Any, Any]:
    """(node tree, data) of YAML text (the nodes carry each key's line); a syntax error names the line."""
    try:
        return yaml.compose(text, Loader=yaml.SafeLoader), yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error)
        raise JaxboothError(f"{path}{line}: invalid YAML ({problem}); fix the syntax there") from None
