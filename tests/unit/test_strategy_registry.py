"""Strategies by name: every one builds with its defaults, options are converted and checked,
and each bad option or name gets an error that names it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from fedstream.server.strategies import (
    STRATEGIES,
    StrategyError,
    build_strategy,
    parse_strategy_options,
)
from fedstream.server.strategies.registry import ALIASES

from tests.unit.strategy_cases import mixed_deltas, run_round, uploads, zeros_like
from tests.unit.test_architecture import ROOT, transport_imports_reachable


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_runs_a_round_with_its_defaults(name: str) -> None:
    deltas = mixed_deltas(7, seed=1)
    model = zeros_like(deltas[0])
    strategy = build_strategy(name)
    assert strategy.name == name
    run_round(strategy, model, uploads(deltas))
    assert any(model[n].abs().sum() > 0 for n in model if model[n].is_floating_point())


@pytest.mark.parametrize(("alias", "name"), sorted(ALIASES.items()))
def test_flower_names_are_aliases(alias: str, name: str) -> None:
    assert build_strategy(alias).name == name


def test_options_arrive_as_strings_or_toml_values() -> None:
    a = build_strategy("trimmed-mean", {"beta": "0.25"})
    b = build_strategy("trimmed-mean", {"beta": 0.25})
    assert a.state_dict() == b.state_dict()


def test_an_unknown_strategy_lists_the_known_ones() -> None:
    with pytest.raises(StrategyError, match="unknown strategy 'fedfoo'; choose one of fedavg,"):
        build_strategy("fedfoo")


def test_scaffold_says_why_it_is_not_available() -> None:
    with pytest.raises(StrategyError, match="'scaffold' is not available yet: it needs control"):
        build_strategy("scaffold")


def test_an_unknown_option_lists_the_strategy_options() -> None:
    with pytest.raises(
        StrategyError, match="strategy 'fedadam': no option 'etta' \\(its options: beta1,"
    ):
        build_strategy("fedadam", {"etta": "0.1"})


def test_fedadagrad_has_no_beta2() -> None:
    with pytest.raises(StrategyError, match="no option 'beta2'"):
        build_strategy("fedadagrad", {"beta2": "0.9"})


@pytest.mark.parametrize(
    ("name", "option", "value"),
    [
        ("fedavg", "server_lr", "0"),
        ("fedavg", "max_examples", "-3"),
        ("fedadam", "beta1", "1.0"),
        ("fedyogi", "tau", "abc"),
        ("fedavgm", "momentum", "1"),
        ("fedprox", "mu", "-1"),
        ("trimmed-mean", "beta", "0.5"),
        ("krum", "f", "1.5"),
        ("multi-krum", "m", "0"),
        ("median", "block_memory_bytes", "10"),
        ("fedavg", "dp_clip_norm", "0"),
    ],
)
def test_a_bad_value_is_refused_naming_the_strategy_and_option(
    name: str, option: str, value: str
) -> None:
    with pytest.raises(StrategyError, match=f"strategy '{name}': option '{option}': .*'{value}'"):
        build_strategy(name, {option: value})


def test_parse_strategy_options() -> None:
    assert parse_strategy_options(["eta=0.1", " beta1 = 0.9", "name=a=b"]) == {
        "eta": "0.1",
        "beta1": "0.9",
        "name": "a=b",
    }


@pytest.mark.parametrize(
    ("pairs", "why"),
    [(["eta"], "key=value"), (["=1"], "key=value"), (["a=1", "a=2"], "'a' is given twice")],
)
def test_parse_strategy_options_refuses_malformed_pairs(pairs: list[str], why: str) -> None:
    with pytest.raises(StrategyError, match=why):
        parse_strategy_options(pairs)


def test_every_option_has_a_description() -> None:
    for info in STRATEGIES.values():
        for option, field in info.options.model_fields.items():
            assert field.description, f"{info.name}: {option}"


def test_strategies_do_not_reach_the_transport() -> None:
    for path in sorted((ROOT / "server" / "strategies").glob("*.py")):
        assert transport_imports_reachable(path) == [], path.name


def test_every_strategy_module_cites_its_sources() -> None:
    for path in sorted(Path(ROOT / "server" / "strategies").glob("*.py")):
        docstring = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
        assert docstring, path.name


def test_a_strategy_state_dict_holds_only_checkpoint_safe_values(tmp_path: Path) -> None:
    strategy = build_strategy("fedadam", {"dp_clip_norm": "1", "dp_seed": "3"})
    model = zeros_like(mixed_deltas(1, seed=0)[0])
    run_round(strategy, model, uploads(mixed_deltas(2, seed=1)))
    torch.save(strategy.state_dict(), tmp_path / "s.pt")
    torch.load(tmp_path / "s.pt", weights_only=True)  # refuses anything but plain data
