"""Read the cluster's compose files the way Compose does, for tests that have no engine.

Three steps of Compose's own loading are reproduced here, small enough to check by eye:
interpolation of ``${VAR}``, ``${VAR:-default}`` and ``${VAR-default}`` (any other form
is refused, so a file using one cannot pass unchecked), ``extends`` of a service in
another file (mappings merge key by key, anything else is replaced), and environment
entries without a value, which Compose takes from the shell or leaves out. The tests
then run the services' commands with the environment a container would get.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
CPU_FILE = DOCKER / "docker-compose.yml"
GPU_FILE = DOCKER / "docker-compose.gpu.yml"
COMPOSE_FILES = (CPU_FILE, GPU_FILE)

_VARIABLE = re.compile(r"\$(?:(?P<escaped>\$)|\{(?P<braced>[^}]*)\}|(?P<bare>[A-Za-z_]\w*))")
_BRACED = re.compile(r"^(?P<name>[A-Za-z_]\w*)(?:(?P<op>:?-)(?P<default>.*))?$")


def load(path: Path) -> dict[str, Any]:
    with path.open(encoding="utf-8") as handle:
        document = yaml.safe_load(handle)
    assert isinstance(document, dict), f"{path} is not a YAML mapping"
    return document


def interpolate_text(text: str, variables: Mapping[str, str]) -> str:
    def substitute(match: re.Match[str]) -> str:
        if match.group("escaped"):
            return "$"
        if match.group("bare"):
            return variables.get(match.group("bare"), "")
        braced = _BRACED.match(match.group("braced"))
        if braced is None:
            raise ValueError(f"unsupported interpolation {match.group(0)!r}")
        name, op, default = braced.group("name", "op", "default")
        value = variables.get(name)
        if op == ":-" and not value:
            return str(default)
        if op == "-" and value is None:
            return str(default)
        return value or ""

    return _VARIABLE.sub(substitute, text)


def interpolate(node: Any, variables: Mapping[str, str]) -> Any:
    """Values with variables replaced; keys and non-strings stay as written."""
    if isinstance(node, str):
        return interpolate_text(node, variables)
    if isinstance(node, dict):
        return {key: interpolate(value, variables) for key, value in node.items()}
    if isinstance(node, list):
        return [interpolate(item, variables) for item in node]
    return node


def merge(base: Any, override: Any) -> Any:
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            merged[key] = merge(base[key], value) if key in base else value
        return merged
    return override


def services(path: Path, variables: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """Every service of ``path`` after interpolation and ``extends``."""
    document = interpolate(load(path), variables)
    resolved = {}
    for name, service in document["services"].items():
        service = dict(service)
        extends = service.pop("extends", None)
        if extends is not None:
            base_file = path.parent / extends.get("file", path.name)
            base = services(base_file, variables)[extends["service"]]
            service = merge(base, service)
        resolved[name] = service
    return resolved


def environment(service: Mapping[str, Any], shell: Mapping[str, str]) -> dict[str, str]:
    """The variables a container of ``service`` starts with (entries without a value
    come from ``shell`` when set there and are left out otherwise)."""
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        raw = dict(item.split("=", 1) if "=" in item else (item, None) for item in raw)
    env = {}
    for key, value in raw.items():
        if value is None:
            if key in shell:
                env[key] = shell[key]
        else:
            env[key] = str(value).lower() if isinstance(value, bool) else str(value)
    return env


def command(service: Mapping[str, Any]) -> list[str]:
    raw = service["command"]
    assert isinstance(raw, list), "commands are written in exec form (a list)"
    return [str(part) for part in raw]


def mounts(service: Mapping[str, Any]) -> dict[str, str]:
    """Container path -> volume name, for the short ``volume:/path[:mode]`` syntax."""
    found = {}
    for entry in service.get("volumes", []):
        source, target = str(entry).split(":")[:2]
        found[target] = source
    return found


def container_port(entry: str) -> int:
    """Container side of a ``ports`` entry such as ``"50051:50051"``."""
    return int(str(entry).rsplit(":", 1)[-1].split("/")[0])


def on_host(env: Mapping[str, str], folders: Mapping[str, Path]) -> dict[str, str]:
    """``env`` with paths under a container mount point moved to the host folder that
    stands in for that volume (``/runs/x`` -> ``<folders['/runs']>/x``)."""
    moved = {}
    for key, value in env.items():
        for target, folder in folders.items():
            if value == target or value.startswith(target.rstrip("/") + "/"):
                value = str(folder) + value[len(target.rstrip("/")) :]
                break
        moved[key] = value
    return moved
