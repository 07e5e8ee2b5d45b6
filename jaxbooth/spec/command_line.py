"""The `jaxbooth train` / `jaxbooth spec` command line: argparse, built from the ``FIELDS`` table.

Every spec key is a flag with diffusers' name (``--learning_rate``; ``--learning-rate`` works too),
in an argument group per section, so ``--help`` lists them all with their description, default
and the backends that support them. Flags take ``--key=value`` or ``--key value``; booleans
also take a bare ``--flag`` and ``--flag false``; list keys take several values (nargs='+').
An optional first argument names a diffusers script (``train_dreambooth_lora.py``) whose
defaults and mode apply (``jaxbooth.spec.presets``).

argparse never prints or exits here: errors become ``JaxboothError`` (unknown flags name the
closest key) and ``--help`` raises ``HelpRequested`` carrying the text, which the CLI prints.
Values are kept as text by argparse and typed by ``coercion.coerce``, so the command line and
YAML files give the same messages.
"""

from __future__ import annotations

import argparse
import inspect
import re
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

from jaxbooth import capabilities  # module object only: capabilities imports jaxbooth.spec.schema
from jaxbooth.errors import JaxboothError
from jaxbooth.spec.coercion import Item, coerce, suggest_key
from jaxbooth.spec.presets import SCRIPT_MODES, preset_items, script_name
from jaxbooth.spec.schema import FIELDS, SECTIONS, FieldInfo, default_flat, strip_optional


class HelpRequested(Exception):
    """``-h``/``--help`` was given; ``text`` is the help to print (then exit 0)."""

    def __init__(self, text: str):
        super().__init__("help requested")
        self.text = text


@dataclass(frozen=True)
class CommandLine:
    """What one command line says, before the preset and the YAML files are read."""

    preset: str | None  # a SCRIPT_PRESETS key: the first argument, --preset, or the caller's default
    config_paths: tuple[str, ...]
    items: tuple[Item, ...]  # the flags, typed, in the order first given


def parse_command_line(argv: Sequence[str], *, preset: str | None = None,
                       prog: str = "jaxbooth train") -> CommandLine:
    """Parse flags (and an optional leading script name); raises JaxboothError or HelpRequested.

    ``preset`` is the caller's default script; a script named on the command line (first
    argument or ``--preset``) replaces it.
    """
    tokens = [_underscored(token) for token in argv]
    script = None
    if tokens and not tokens[0].startswith("-"):
        script, tokens = script_name(tokens[0]), tokens[1:]
    default = script_name(preset, what="preset") if preset is not None else None
    namespace, extras = make_parser(prog, script or default).parse_known_args(tokens)
    values = vars(namespace)
    flag_preset = values.pop("preset", None)
    if flag_preset is not None:
        flag_preset = script_name(flag_preset, what="preset")
        if script is not None and script != flag_preset:
            raise JaxboothError(f"the script {script} and --preset={flag_preset} disagree; give only one")
    chosen = script or flag_preset or default
    if values.pop("help", False):
        raise HelpRequested(make_parser(prog, chosen).format_help())
    if extras:
        raise JaxboothError(_unknown_arguments(extras))
    configs = tuple(values.pop("config", ()))
    items = tuple((name, coerce(FIELDS[name], raw, f"--{name}"), f"--{name}") for name, raw in values.items())
    return CommandLine(chosen, configs, items)


def format_help(prog: str = "jaxbooth train", preset: str | None = None) -> str:
    """The ``--help`` text: every key by section, with description, default and backends."""
    return make_parser(prog, script_name(preset, what="preset") if preset else None).format_help()


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that raises instead of printing usage and exiting."""

    def error(self, message: str) -> NoReturn:
        raise JaxboothError(_reword(message))

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        raise JaxboothError(message or f"{self.prog}: argument parsing stopped (status {status})")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's layout; wraps option help without splitting '5e-06' or '--mixed_precision'."""

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


def make_parser(prog: str, preset: str | None) -> argparse.ArgumentParser:
    """The parser for ``prog``; ``preset`` (a SCRIPT_PRESETS key) only changes the defaults shown."""
    defaults = default_flat()
    defaults.update({name: value for name, value, _ in preset_items(preset)})
    parser = _Parser(prog=prog, usage="%(prog)s [SCRIPT.py] [--config RUN.yaml] [--KEY VALUE ...]",
                     description=_description(prog, preset), add_help=False, allow_abbrev=False,
                     formatter_class=_HelpFormatter)
    general = parser.add_argument_group("general", "Where the run spec comes from, and which backend runs it.")
    general.add_argument("-h", "--help", action="store_true", default=argparse.SUPPRESS,
                         help="Show this help (with the defaults of SCRIPT.py, if given) and exit.")
    general.add_argument("--config", action="append", default=argparse.SUPPRESS, metavar="RUN.yaml",
                         help="A YAML run spec (nested by section or flat; 'extends: base.yaml' works). "
                              "Repeatable: later files win, flags win over all files.")
    general.add_argument("--preset", default=argparse.SUPPRESS, metavar="SCRIPT.py",
                         help="Another way to name the diffusers script whose defaults apply.")
    _add_field(general, FIELDS["backend"], defaults["backend"])
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(section, inspect.cleandoc(cls.__doc__ or ""))
        for info in FIELDS.values():
            if info.section == section:
                _add_field(group, info, defaults[info.name])
    return parser


def _add_field(group: Any, info: FieldInfo, default: Any) -> None:
    """One ``--key``: raw text in, no default (unset keys stay out of the namespace)."""
    options: dict[str, Any] = {"dest": info.name, "default": argparse.SUPPRESS, "help": _field_help(info, default)}
    inner = strip_optional(info.annotation)[0]
    metavar = "{" + ",".join(info.choices) + "}" if info.choices else _METAVARS.get(inner, "VALUE")
    if info.kind == "bool":
        options.update(nargs="?", const=True, metavar="true|false")
    elif info.kind == "list":
        options.update(nargs="+", metavar="VALUE")
    else:
        options.update(metavar=metavar)
    group.add_argument(f"--{info.name}", **options)


_METAVARS = {int: "INT", float: "FLOAT", str: "TEXT"}


def _field_help(info: FieldInfo, default: Any) -> str:
    text = (f"{info.doc} Default: {_show(default)}. "
            f"Backends: {capabilities.backend_support(info.name)}.")
    return text.replace("%", "%%")  # argparse %-formats help strings


def _show(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return " ".join(value)
    return str(value)


def _description(prog: str, preset: str | None) -> str:
    what = ("Print the resolved run spec as YAML (nothing is loaded or trained); same flags as jaxbooth train."
            if prog.endswith(" spec") else "DreamBooth fine-tuning with diffusers' train_dreambooth*.py flags.")
    scripts = "\n".join(f"  {name:31} {mode}" for name, mode in SCRIPT_MODES.items())
    shown = f"Defaults below are those of {preset}." if preset else "Defaults below are train_dreambooth.py's."
    return (f"{what}\n\n"
            "SCRIPT.py, if given first (a path is fine), selects that diffusers script's defaults and mode:\n"
            f"{scripts}\n\n"
            "Precedence, lowest first: defaults, the script's defaults, --config files in order, flags.\n"
            "Flags: --key=value or --key value; --flag or --flag=false for booleans; several values\n"
            "for list keys; dashes work too (--learning-rate). " + shown)


def _underscored(token: str) -> str:
    """``--learning-rate=1e-4`` -> ``--learning_rate=1e-4``: diffusers' names use underscores."""
    if not token.startswith("--") or token == "--":
        return token
    name, eq, value = token[2:].partition("=")
    return "--" + name.replace("-", "_") + eq + value


def _unknown_arguments(extras: Sequence[str]) -> str:
    """One message for what argparse did not recognise: misspelt flags first, with suggestions."""
    options = [token for token in extras if token.startswith("-")]
    if not options:
        return (f"unexpected argument {extras[0]!r}: options look like --key=value (if it is a value "
                "with spaces, quote it); a diffusers script name may only come first")
    problems = []
    for token in options:
        name = token.lstrip("-").partition("=")[0]
        problems.append(f"--{name}: unknown option{suggest_key(name, list(FIELDS))}")
    return problems[0] if len(problems) == 1 else "unknown options:\n  - " + "\n  - ".join(problems)


def _reword(message: str) -> str:
    """argparse's 'argument --x: expected one argument' in jaxbooth's words (flag and fix)."""
    match = re.fullmatch(r"argument (\S+): (.*)", message, flags=re.S)
    if match is None:
        return message
    flag, problem = match.group(1).split("/")[-1], match.group(2)
    if problem == "expected one argument":
        return f"{flag} needs a value: write {flag}=VALUE"
    if problem == "expected at least one argument":
        return f"{flag} needs one or more values: {flag} A [B ...]"
    return f"{flag}: {problem}"
