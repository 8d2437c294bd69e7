"""Build one frozen settings object from defaults, a TOML file, the environment and flags.

Precedence, lowest to highest: the model's defaults, the TOML config file, environment
variables (``<PREFIX><FIELD>``, e.g. ``FL_SERVER_ROUNDS=20``), command-line flags. Each
settings class is a frozen pydantic model, so a bad value fails at start with a message
naming the field, and nothing downstream can change the settings after ``main()``.
"""

from __future__ import annotations

import argparse
import os
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, TypeVar, get_origin

from fedstream.common.errors import ConfigError
from fedstream.common.messages import Scalar
from pydantic import BaseModel, BeforeValidator, ValidationError
from pydantic_core import PydanticUndefined

SettingsT = TypeVar("SettingsT", bound=BaseModel)


def parse_scalar(text: str) -> Scalar:
    """A ``key=value`` value as what it looks like: bool, int, float or text."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _key_values(value: object) -> dict[str, str]:
    """``key=value`` pairs from repeated flags (a list), an environment variable
    (``a=1,b=2``) or a TOML table, as a dict of strings."""
    if isinstance(value, Mapping):
        return {str(k): str(v).lower() if isinstance(v, bool) else str(v)
                for k, v in value.items()}
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple):
        raise ValueError("expected key=value pairs")
    pairs: dict[str, str] = {}
    for item in items:
        key, sep, text = str(item).partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{item!r} is not key=value")
        pairs[key.strip()] = text.strip()
    return pairs


# A settings field of repeatable ``--flag key=value`` options.
KeyValues = Annotated[dict[str, str], BeforeValidator(_key_values)]


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def add_flags(
    parser: argparse.ArgumentParser,
    model: type[BaseModel],
    short: Mapping[str, str] | None = None,
    renames: Mapping[str, str] | None = None,
) -> None:
    """Add one flag per settings field, with the field's description as help text.

    Flags default to "not given" so that lower-precedence sources are not overridden.
    ``renames`` maps a field to the flag users know it by (``round_timeout_s`` ->
    ``--round-timeout``).
    """
    short = short or {}
    renames = renames or {}
    for name, field in model.model_fields.items():
        flags = [renames.get(name, flag_name(name))]
        if name in short:
            flags.insert(0, short[name])
        default = field.default if field.default is not PydanticUndefined else None
        help_text = field.description
        if help_text and "default" not in help_text:
            help_text += f" (default: {default!r})"
        annotation = field.annotation
        if get_origin(annotation) is dict:
            parser.add_argument(
                *flags, dest=name, action="append", default=argparse.SUPPRESS,
                metavar="KEY=VALUE", help=(help_text or "") + "; repeatable",
            )
        elif annotation is bool:
            parser.add_argument(
                *flags,
                dest=name,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=help_text,
            )
        else:
            parser.add_argument(
                *flags, dest=name, default=argparse.SUPPRESS, metavar=name.upper(), help=help_text
            )


def env_values(model: type[BaseModel], prefix: str, environ: Mapping[str, str]) -> dict[str, str]:
    values = {}
    for name in model.model_fields:
        key = f"{prefix}{name.upper()}"
        if key in environ:
            values[name] = environ[key]
    return values


def toml_values(model: type[BaseModel], path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            data = tomllib.load(handle)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    unknown = sorted(set(data) - set(model.model_fields))
    if unknown:
        raise ConfigError(f"config file {path}: unknown settings {unknown}")
    return data


def load_settings(
    model: type[SettingsT],
    prefix: str,
    flags: Mapping[str, Any],
    config_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> SettingsT:
    """Merge the sources and validate them, raising ConfigError naming the bad field."""
    environ = os.environ if environ is None else environ
    merged: dict[str, Any] = {}
    if config_file is not None:
        merged.update(toml_values(model, config_file))
    merged.update(env_values(model, prefix, environ))
    merged.update(flags)
    try:
        return model.model_validate(merged)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'settings'}: {err['msg']}"
            for err in exc.errors()
        )
        raise ConfigError(f"invalid setting - {problems}") from exc


def parse_into(
    parser: argparse.ArgumentParser,
    model: type[SettingsT],
    prefix: str,
    argv: Sequence[str] | None,
) -> SettingsT:
    """Parse ``argv`` (which may hold ``--config FILE``) into a validated settings object."""
    namespace = vars(parser.parse_args(argv))
    config = namespace.pop("config", None)
    return load_settings(model, prefix, namespace, Path(config) if config else None)
