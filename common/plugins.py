"""Load a user's own model or dataset factory from an import path ``package.module:function``.

This imports code the *local* user named on the command line or in a config file; it is
never applied to anything received over the network.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from fedstream.common.errors import ConfigError


def is_import_path(name: str) -> bool:
    return ":" in name


def load_callable(path: str) -> Callable[..., Any]:
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"{path!r} is not of the form package.module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"cannot import {module_name!r} for {path!r}: {exc}") from exc
    target: Any = module
    for part in attr.split("."):
        try:
            target = getattr(target, part)
        except AttributeError as exc:
            raise ConfigError(f"{module_name!r} has no attribute {attr!r}") from exc
    if not callable(target):
        raise ConfigError(f"{path!r} is not callable")
    return target  # type: ignore[no-any-return]
