"""The README documents every flag the commands accept (it is the first thing users read)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from fedstream.client.main import build_parser as client_parser
from fedstream.server.healthcheck import build_parser as healthcheck_parser
from fedstream.server.launcher import build_parser as launcher_parser
from fedstream.server.main import build_parser as server_parser

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def _flags(parser: argparse.ArgumentParser) -> list[str]:
    return [
        option
        for action in parser._actions
        for option in action.option_strings
        if option.startswith("--") and option != "--help"
    ]


@pytest.mark.parametrize(
    "parser",
    [server_parser(), client_parser(), launcher_parser(), healthcheck_parser({})],
    ids=["server", "client", "local", "healthcheck"],
)
def test_every_flag_is_in_the_readme(parser: argparse.ArgumentParser) -> None:
    missing = [flag for flag in _flags(parser) if f"`{flag}" not in README]
    assert not missing, f"README lacks {missing}"


def test_readme_names_the_two_commands() -> None:
    assert "make run" in README and "make test" in README


@pytest.mark.parametrize("prefix", ["FL_SERVER_", "FL_CLIENT_"])
def test_readme_defaults_match_the_settings(prefix: str) -> None:
    from fedstream.client.settings import ClientSettings
    from fedstream.server.settings import ServerSettings

    model = ServerSettings if prefix == "FL_SERVER_" else ClientSettings
    rows = {
        cells[2].strip("` "): cells[3].strip()
        for line in README.splitlines()
        if line.startswith("| `--") and (cells := line.split("|")) and prefix in line
    }
    for name, field in model.model_fields.items():
        documented = rows.get(f"{prefix}{name.upper()}")
        assert documented is not None, f"{prefix}{name.upper()} missing from the README table"
        default = field.get_default(call_default_factory=True)
        expected = "-" if default is None or default == {} else f"`{default}`"
        assert documented == expected, f"{name}: README says {documented}, code {expected}"
