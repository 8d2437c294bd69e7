"""Settings: defaults < TOML file < FL_SERVER_* / FL_CLIENT_* < flags, validated once.

``load_settings`` takes the environment as an argument, so most tests pass a dict and
never touch the process environment; tests of ``parse_into`` and ``main`` (which read
``os.environ``) set it through ``monkeypatch`` and start from an environment without any
FL_* variable.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from fedstream.client import main as client_main
from fedstream.client.settings import ENV_PREFIX as CLIENT_PREFIX
from fedstream.client.settings import ClientSettings
from fedstream.common.config import load_settings, parse_into
from fedstream.common.errors import ConfigError
from fedstream.server import main as server_main
from fedstream.server.settings import ENV_PREFIX as SERVER_PREFIX
from fedstream.server.settings import ServerSettings
from pydantic import ValidationError


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(os.environ):
        if key.startswith(("FL_SERVER_", "FL_CLIENT_")):
            monkeypatch.delenv(key)


def write_toml(folder: Path, text: str) -> Path:
    path = folder / "settings.toml"
    path.write_text(text, encoding="utf-8")
    return path


def server(
    flags: dict[str, Any] | None = None,
    environ: dict[str, str] | None = None,
    config: Path | None = None,
) -> ServerSettings:
    return load_settings(ServerSettings, SERVER_PREFIX, flags or {}, config, environ or {})


# ---- precedence -------------------------------------------------------------------------


def test_defaults_apply_when_nothing_is_given() -> None:
    settings = server()
    assert settings.rounds == 10
    assert settings.port == 50051
    assert settings.evaluate is True
    assert settings.optimizer == "sgd"


def test_toml_file_overrides_defaults(tmp_path: Path) -> None:
    config = write_toml(tmp_path, 'rounds = 3\noptimizer = "adam"\ndata_dir = "/srv/data"\n')
    settings = server(config=config)
    assert settings.rounds == 3
    assert settings.optimizer == "adam"
    assert settings.data_dir == Path("/srv/data")
    assert settings.port == 50051  # untouched fields keep their defaults


def test_environment_overrides_toml_file(tmp_path: Path) -> None:
    config = write_toml(tmp_path, "rounds = 3\nseed = 4\n")
    settings = server(environ={"FL_SERVER_ROUNDS": "5"}, config=config)
    assert settings.rounds == 5
    assert settings.seed == 4


def test_flags_override_environment(tmp_path: Path) -> None:
    config = write_toml(tmp_path, "rounds = 3\nseed = 4\nbatch_size = 16\n")
    settings = server(
        flags={"rounds": "7"},
        environ={"FL_SERVER_ROUNDS": "5", "FL_SERVER_SEED": "6"},
        config=config,
    )
    assert (settings.rounds, settings.seed, settings.batch_size) == (7, 6, 16)


def test_parse_into_applies_every_layer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write_toml(tmp_path, "rounds = 3\nseed = 4\nbatch_size = 16\n")
    monkeypatch.setenv("FL_SERVER_ROUNDS", "5")
    monkeypatch.setenv("FL_SERVER_SEED", "6")
    settings = parse_into(
        server_main.build_parser(),
        ServerSettings,
        SERVER_PREFIX,
        ["--config", str(config), "--rounds", "7"],
    )
    assert (settings.rounds, settings.seed, settings.batch_size, settings.port) == (7, 6, 16, 50051)


def test_environment_of_the_other_process_kind_is_ignored() -> None:
    settings = server(environ={"FL_CLIENT_BATCH_SIZE": "3", "ROUNDS": "2"})
    assert settings.batch_size == 32
    assert settings.rounds == 10


def test_renamed_flag_sets_its_field() -> None:
    settings = parse_into(
        server_main.build_parser(),
        ServerSettings,
        SERVER_PREFIX,
        ["--round-timeout", "2.5", "--join-timeout", "9"],
    )
    assert settings.round_timeout_s == 2.5
    assert settings.join_timeout_s == 9.0


def test_partitions_default_to_min_clients() -> None:
    assert server({"min_clients": "3"}).partitions == 3
    assert server({"min_clients": "3", "num_partitions": "8"}).partitions == 8


# ---- bool flags -------------------------------------------------------------------------


@pytest.mark.parametrize(("argv", "expected"), [(["--no-evaluate"], False), (["--evaluate"], True)])
def test_bool_flag_has_a_negative_form(argv: list[str], expected: bool) -> None:
    settings = parse_into(server_main.build_parser(), ServerSettings, SERVER_PREFIX, argv)
    assert settings.evaluate is expected


def test_bool_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FL_SERVER_EVALUATE", "false")
    monkeypatch.setenv("FL_SERVER_DOWNLOAD", "1")
    settings = parse_into(server_main.build_parser(), ServerSettings, SERVER_PREFIX, [])
    assert settings.evaluate is False
    assert settings.download is True


def test_bool_flag_overrides_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FL_SERVER_EVALUATE", "false")
    settings = parse_into(
        server_main.build_parser(), ServerSettings, SERVER_PREFIX, ["--evaluate"]
    )
    assert settings.evaluate is True


# ---- invalid values ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("rounds", "0"),
        ("port", "70000"),
        ("port", "-1"),
        ("optimizer", "rmsprop"),
        ("test_fraction", "1.0"),
        ("chunk_size_bytes", "100"),
        ("momentum", "1.0"),
        ("partition", "pathological"),
        ("log_level", "TRACE"),
        ("rounds", "many"),
    ],
)
def test_invalid_flag_value_names_the_field(field: str, value: str) -> None:
    with pytest.raises(ConfigError, match=field):
        server({field: value})


def test_invalid_environment_value_names_the_field() -> None:
    with pytest.raises(ConfigError, match="port"):
        server(environ={"FL_SERVER_PORT": "abc"})


def test_invalid_toml_value_names_the_field(tmp_path: Path) -> None:
    config = write_toml(tmp_path, "round_timeout_s = -1.0\n")
    with pytest.raises(ConfigError, match="round_timeout_s"):
        server(config=config)


def test_clients_per_round_below_min_clients_is_refused() -> None:
    with pytest.raises(ConfigError, match="clients_per_round"):
        server({"clients_per_round": "1", "min_clients": "2"})


def test_clients_per_round_zero_means_everyone_and_is_accepted() -> None:
    assert server({"clients_per_round": "0", "min_clients": "5"}).clients_per_round == 0


def test_unknown_toml_key_is_refused(tmp_path: Path) -> None:
    config = write_toml(tmp_path, "rounds = 3\nlearning_rate_typo = 0.1\n")
    with pytest.raises(ConfigError, match="learning_rate_typo"):
        server(config=config)


def test_toml_syntax_error_is_a_config_error(tmp_path: Path) -> None:
    config = write_toml(tmp_path, "rounds = = 3\n")
    with pytest.raises(ConfigError, match="TOML"):
        server(config=config)


def test_missing_config_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        server(config=tmp_path / "absent.toml")


# ---- frozen -----------------------------------------------------------------------------


def test_server_settings_are_frozen() -> None:
    settings = server()
    with pytest.raises(ValidationError):
        settings.rounds = 3  # type: ignore[misc,unused-ignore]
    assert settings.rounds == 10


def test_client_settings_are_frozen() -> None:
    settings = load_settings(ClientSettings, CLIENT_PREFIX, {}, None, {})
    with pytest.raises(ValidationError):
        settings.server = "elsewhere:1"  # type: ignore[misc,unused-ignore]
    assert settings.server == "localhost:50051"


# ---- client settings --------------------------------------------------------------------


def test_client_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = write_toml(tmp_path, 'server = "toml:1"\ngpu = 0\nbatch_size = 8\nmax_steps = 4\n')
    monkeypatch.setenv("FL_CLIENT_SERVER", "env:2")
    monkeypatch.setenv("FL_CLIENT_GPU", "1")
    settings = parse_into(
        client_main.build_parser(),
        ClientSettings,
        CLIENT_PREFIX,
        ["--config", str(config), "--server", "flag:3", "--connect-timeout", "4"],
    )
    assert settings.server == "flag:3"
    assert settings.gpu == 1
    assert settings.batch_size == 8
    assert settings.max_steps == 4
    assert settings.connect_timeout_s == 4.0
    assert settings.learning_rate is None  # left to the server


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("client_id", "has space"),
        ("client_id", "x" * 129),
        ("gpu", "-1"),
        ("num_threads", "0"),
        ("optimizer", "rmsprop"),
        ("chunk_size_bytes", str(4 << 20)),
    ],
)
def test_invalid_client_value_names_the_field(field: str, value: str) -> None:
    with pytest.raises(ConfigError, match=field):
        load_settings(ClientSettings, CLIENT_PREFIX, {field: value}, None, {})


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("localhost", "host:port"),
        ("127.0.0.1:abc", "port"),
        ("127.0.0.1:0", "port"),
        ("127.0.0.1:70000", "port"),
        ("http://127.0.0.1:50051", "without a scheme"),
        ("dns:///server:50051", "without a scheme"),
        ("::1:50051", "brackets"),
        ("[::1:50051", "host:port"),
        ("[zz::1]:50051", "IPv6"),
        ("bad host:50051", "host"),
        (":50051", "host"),
    ],
)
def test_server_address_must_be_host_and_port(value: str, why: str) -> None:
    with pytest.raises(ConfigError, match=f"server:.*{why}"):
        load_settings(ClientSettings, CLIENT_PREFIX, {"server": value}, None, {})


@pytest.mark.parametrize(
    "value",
    ["localhost:50051", "127.0.0.1:1", "[::1]:50051", "server:50051", "fl_server.example.org:443"],
)
def test_server_address_in_host_port_form_is_accepted(value: str) -> None:
    settings = load_settings(ClientSettings, CLIENT_PREFIX, {"server": value}, None, {})
    assert settings.server == value


def test_client_main_with_a_malformed_server_exits_2_naming_the_field(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert client_main.main(["--server", "localhost"]) == 2
    assert "server" in capsys.readouterr().err


def test_unknown_client_toml_key_is_refused(tmp_path: Path) -> None:
    config = write_toml(tmp_path, "rounds = 3\n")  # a server setting, not a client one
    with pytest.raises(ConfigError, match="rounds"):
        load_settings(ClientSettings, CLIENT_PREFIX, {}, config, {})


# ---- main() -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "field"),
    [(["--port", "70000"], "port"), (["--rounds", "0"], "rounds")],
)
def test_server_main_with_a_bad_value_exits_2_naming_the_field(
    capsys: pytest.CaptureFixture[str], argv: list[str], field: str
) -> None:
    assert server_main.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("fl-server:")
    assert field in err


def test_server_main_with_a_bad_environment_value_exits_2(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FL_SERVER_OPTIMIZER", "rmsprop")
    assert server_main.main([]) == 2
    assert "optimizer" in capsys.readouterr().err


def test_server_main_with_an_unknown_flag_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        server_main.main(["--no-such-flag"])
    assert caught.value.code == 2
    assert "--no-such-flag" in capsys.readouterr().err


def test_client_main_with_a_bad_value_exits_2_naming_the_field(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert client_main.main(["--batch-size", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fl-client:")
    assert "batch_size" in err
