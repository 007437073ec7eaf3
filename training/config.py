"""A training script's settings, declared once: a frozen dataclass whose fields are
the command line.

    @dataclass(frozen=True)
    class TrainConfig(RunConfig):
        learning_rate: float = field(
            default=2e-4, metadata={"help": "Adam step size", "flag": "--lr"}
        )

Each field gives its type, its default and one line of help; ``config_parser``
turns the fields into ``--field-name`` options and ``parse_config`` turns a
command line into an instance, so nothing is declared twice;
``config_command_line`` goes back from an instance to its options, and
``config_record`` is what an artifact's metadata records. The type comes from the
annotation: ``int``, ``float``, ``str``, ``Path``; ``X | None`` (default
``None``); ``bool`` (a switch: ``store_true``, or ``--no-...`` when it defaults
to true); ``tuple[X, ...]`` (one or more values) and ``tuple[X, X]`` (exactly
two). A field's ``metadata`` may also give

    flag       the option's name where it is not ``--field-name`` (``--lr``)
    choices    the values it accepts
    parse      the argparse type that reads and checks a value (``--device``)
    plumbing   true for where and how a run happens rather than what it trains
               (directories, device, threads): ``RunConfig.settings`` leaves it out

Help is one line; ``{NAME}`` in it is the config class's attribute ``NAME``, so
a shared option names each script's own default. argparse %-formats help, so a
literal percent sign is written ``%%``.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

C = TypeVar("C")


class HelpFormatter(argparse.HelpFormatter):
    """Adds ``(default: ...)`` where a default says something (not None, not false)
    and the help does not already give one."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if default in (None, False, ()) or "default" in text:
            return text
        if default is argparse.SUPPRESS:
            return text
        if isinstance(default, tuple):
            return f"{text} (default: {' '.join(map(str, default))})"
        return f"{text} (default: %(default)s)"


def flag(field: dataclasses.Field) -> str:
    return field.metadata.get("flag") or "--" + field.name.replace("_", "-")


def default_of(field: dataclasses.Field) -> Any:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def _without_none(hint: Any) -> Any:
    """``X | None`` → ``X``; any other annotation as it is."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        kinds = [kind for kind in typing.get_args(hint) if kind is not type(None)]
        if len(kinds) == 1:
            return kinds[0]
    return hint


def _argument(config_type: type, field: dataclasses.Field, hint: Any) -> dict[str, Any]:
    """``add_argument``'s keywords for one field."""
    if "help" not in field.metadata:
        raise TypeError(f"{config_type.__name__}.{field.name}: no help in its metadata")
    names = {name: getattr(config_type, name) for name in dir(config_type)}
    kind = _without_none(hint)
    default = default_of(field)
    options: dict[str, Any] = {
        "dest": field.name,
        "default": default,
        "help": field.metadata["help"].format_map(names),
    }
    if kind is bool:
        options["action"] = argparse.BooleanOptionalAction if default else "store_true"
        return options
    if typing.get_origin(kind) is tuple:
        items = typing.get_args(kind)
        repeated = len(items) == 2 and items[1] is Ellipsis
        if not repeated and len(set(items)) != 1:
            raise TypeError(f"{config_type.__name__}.{field.name}: mixed tuple {kind}")
        options["nargs"] = "+" if repeated else len(items)
        kind = items[0]
    if kind not in (int, float, str, Path):
        raise TypeError(f"{config_type.__name__}.{field.name}: no option for the type {hint}")
    options["type"] = field.metadata.get("parse", kind)
    if "choices" in field.metadata:
        options["choices"] = field.metadata["choices"]
    else:  # named after the flag (``--lr LR``), not the field
        options["metavar"] = flag(field)[2:].upper().replace("-", "_")
    return options


def config_parser(config_type: type, description: str | None = None) -> argparse.ArgumentParser:
    """One ``--field-name`` option per field of ``config_type``, in declaration order."""
    parser = argparse.ArgumentParser(
        description=description.split("\n\n")[0] if description else None,
        formatter_class=HelpFormatter,
    )
    hints = typing.get_type_hints(config_type)
    for field in dataclasses.fields(config_type):
        parser.add_argument(flag(field), **_argument(config_type, field, hints[field.name]))
    return parser


def parse_config(
    config_type: type[C], argv: typing.Sequence[str] | None = None, description=None
) -> C:
    """The config a command line asks for (argparse's own errors name the bad flag)."""
    values = vars(config_parser(config_type, description).parse_args(argv))
    return config_type(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def config_command_line(config: Any) -> list[str]:
    """The options that give ``config`` (those that differ from their defaults)."""
    argv: list[str] = []
    for field in dataclasses.fields(config):
        value, default = getattr(config, field.name), default_of(field)
        if value == default:
            continue
        if isinstance(value, bool):
            argv.append(flag(field) if value else "--no-" + flag(field)[2:])
        elif value is None:
            raise ValueError(f"{flag(field)}: no option sets None over {default!r}")
        elif isinstance(value, tuple):
            argv += [flag(field), *map(str, value)]
        else:
            argv += [flag(field), str(value)]
    return argv


def config_record(config: Any) -> dict[str, Any]:
    """``dataclasses.asdict`` with paths as text: JSON for the metadata, and plain
    values for a checkpoint (which loads with ``weights_only=True``)."""

    def plain(value: Any) -> Any:
        if isinstance(value, tuple):
            return tuple(plain(item) for item in value)
        return str(value) if isinstance(value, Path) else value

    return {name: plain(value) for name, value in dataclasses.asdict(config).items()}
