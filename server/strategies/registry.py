"""Strategies by name, with validated options: ``build_strategy("fedadam", {"eta": "0.01"})``.

Options arrive as strings from ``--strategy-opt key=value`` (see
:func:`parse_strategy_options`) or as TOML values from a ``[strategy]`` table; each
strategy's options are a frozen pydantic model that converts and checks them, so a bad
value fails at start with a message naming the strategy and the option. The table
:data:`STRATEGIES` is also what the README's strategy table documents.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import pydantic
from fedstream.common.codec import Manifest
from fedstream.server.strategies.base import ConfigValue, Reduction, Strategy, StrategyError
from fedstream.server.strategies.composite import ServerStrategy
from fedstream.server.strategies.fedavg import MeanReduction
from fedstream.server.strategies.optimizers import (
    Adaptivity,
    ServerAdaptive,
    ServerMomentum,
    ServerOptimizer,
    ServerSGD,
)
from fedstream.server.strategies.privacy import CentralPrivacy, PrivateMeanReduction
from fedstream.server.strategies.robust import (
    DEFAULT_BLOCK_MEMORY_BYTES,
    Bulyan,
    KeptReduction,
    Krum,
    Median,
    RobustRule,
    TrimmedMean,
)

OptionValue = str | int | float | bool
Field = pydantic.Field


class Options(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)


class MeanOptions(Options):
    """Options of every strategy built on the weighted mean (FedAvg and its optimizers)."""

    max_examples: int | None = Field(
        None, ge=1, lt=1 << 53, description="cap on each client's claimed example weight"
    )
    dp_clip_norm: float | None = Field(
        None, gt=0, description="central DP: clip each client's update to this L2 norm"
    )
    dp_noise_multiplier: float = Field(
        0.0, ge=0, description="central DP: noise stddev on the sum, in units of the clip norm"
    )
    dp_adaptive: bool = Field(False, description="central DP: adapt the clip norm each round")
    dp_target_quantile: float = Field(
        0.5, gt=0, lt=1, description="adaptive clipping: share of updates left unclipped"
    )
    dp_clip_lr: float = Field(0.2, gt=0, description="adaptive clipping: geometric step size")
    dp_count_stddev: float | None = Field(
        None, gt=0, description="adaptive clipping: noise on the unclipped count (K/20)"
    )
    dp_seed: int | None = Field(None, description="central DP: noise seed (default: from the OS)")

    @pydantic.model_validator(mode="after")
    def _dp_needs_a_clip_norm(self) -> MeanOptions:
        if self.dp_clip_norm is None:
            given = sorted(
                name
                for name in ("dp_noise_multiplier", "dp_adaptive", "dp_count_stddev", "dp_seed")
                if name in self.model_fields_set
            )
            if given:
                raise ValueError(f"option(s) {', '.join(given)} need option 'dp_clip_norm'")
        return self


class FedAvgOptions(MeanOptions):
    server_lr: float = Field(1.0, gt=0, description="server step size on the averaged delta")


class FedProxOptions(FedAvgOptions):
    mu: float = Field(0.01, ge=0, description="proximal term weight, sent as proximal_mu")


class FedAvgMOptions(MeanOptions):
    momentum: float = Field(0.9, ge=0, lt=1, description="server momentum beta")
    server_lr: float | None = Field(
        None, gt=0, description="server step size (default 1 - momentum)"
    )


class FedOptOptions(MeanOptions):
    eta: float = Field(0.01, gt=0, description="server learning rate")
    eta_l: float | None = Field(
        None, gt=0, description="client learning rate sent to clients (default: theirs)"
    )
    beta1: float = Field(0.9, ge=0, lt=1, description="first-moment decay")
    tau: float = Field(1e-3, gt=0, description="adaptivity: added to sqrt(v)")


class FedAdamOptions(FedOptOptions):
    beta2: float = Field(0.99, ge=0, lt=1, description="second-moment decay")


class FedAdagradOptions(FedOptOptions):
    eta: float = Field(0.1, gt=0, description="server learning rate")


class RobustOptions(Options):
    server_lr: float = Field(1.0, gt=0, description="server step size on the robust aggregate")
    block_memory_bytes: int = Field(
        DEFAULT_BLOCK_MEMORY_BYTES,
        ge=1 << 16,
        description="working memory of the block-wise reduction (sets the block size from K)",
    )


class TrimmedMeanOptions(RobustOptions):
    beta: float = Field(0.1, ge=0, lt=0.5, description="fraction trimmed at each end")


class KrumOptions(RobustOptions):
    f: int = Field(1, ge=0, description="number of Byzantine clients tolerated")


class MultiKrumOptions(KrumOptions):
    m: int | None = Field(None, ge=1, description="uploads averaged (default K - f)")


# ---- builders ---------------------------------------------------------------------------


def _mean_strategy(
    name: str,
    options: MeanOptions,
    optimizer: ServerOptimizer,
    client_config: Mapping[str, ConfigValue] | None = None,
) -> ServerStrategy:
    if options.dp_clip_norm is None:

        def mean(round_number: int, manifest: Manifest) -> Reduction:
            return MeanReduction(manifest)

        return ServerStrategy(
            name, mean, optimizer, client_config, max_examples=options.max_examples
        )
    privacy = CentralPrivacy(
        options.dp_clip_norm,
        options.dp_noise_multiplier,
        adaptive=options.dp_adaptive,
        target_quantile=options.dp_target_quantile,
        clip_lr=options.dp_clip_lr,
        count_stddev=options.dp_count_stddev,
        seed=options.dp_seed,
    )

    def private(round_number: int, manifest: Manifest) -> Reduction:
        return PrivateMeanReduction(manifest, privacy)

    return ServerStrategy(
        name,
        private,
        optimizer,
        client_config,
        max_examples=options.max_examples,
        extra_state=lambda: {"privacy": privacy.state_dict()},
        load_extra_state=lambda state: privacy.load_state_dict(state.get("privacy", {})),
    )


def _fedavg(options: FedAvgOptions) -> Strategy:
    return _mean_strategy("fedavg", options, ServerSGD(options.server_lr))


def _fedprox(options: FedProxOptions) -> Strategy:
    return _mean_strategy(
        "fedprox", options, ServerSGD(options.server_lr), {"proximal_mu": options.mu}
    )


def _fedavgm(options: FedAvgMOptions) -> Strategy:
    lr = options.server_lr if options.server_lr is not None else 1 - options.momentum
    return _mean_strategy("fedavgm", options, ServerMomentum(lr, options.momentum))


def _fedopt(rule: Adaptivity) -> Callable[[FedOptOptions], Strategy]:
    def build(options: FedOptOptions) -> Strategy:
        beta2 = options.beta2 if isinstance(options, FedAdamOptions) else 0.0
        optimizer = ServerAdaptive(rule, options.eta, options.beta1, beta2, options.tau)
        config: dict[str, ConfigValue] = {}
        if options.eta_l is not None:
            config["learning_rate"] = options.eta_l
        return _mean_strategy(f"fed{rule.value}", options, optimizer, config)

    return build


def _robust(name: str, rule: Callable[[Any], RobustRule]) -> Callable[[RobustOptions], Strategy]:
    def build(options: RobustOptions) -> Strategy:
        chosen = rule(options)

        def kept(round_number: int, manifest: Manifest) -> Reduction:
            return KeptReduction(manifest, chosen, options.block_memory_bytes)

        return ServerStrategy(name, kept, ServerSGD(options.server_lr))

    return build


@dataclass(frozen=True)
class StrategyInfo:
    """A strategy's entry: how to build it and what the README says of it."""

    name: str
    options: type[Options]
    build: Callable[[Any], Strategy]
    summary: str
    memory: str
    paper: str


MODEL = "1 model"
STRATEGIES: dict[str, StrategyInfo] = {
    info.name: info
    for info in (
        StrategyInfo(
            "fedavg", FedAvgOptions, _fedavg, "example-weighted mean of the deltas",
            f"{MODEL} (running sum)", "McMahan et al. 2017, arXiv:1602.05629",
        ),
        StrategyInfo(
            "fedprox", FedProxOptions, _fedprox,
            "FedAvg; clients add mu/2 ||w - w_global||^2 to their loss",
            f"{MODEL} (running sum)", "Li et al. 2020, arXiv:1812.06127",
        ),
        StrategyInfo(
            "fedavgm", FedAvgMOptions, _fedavgm, "FedAvg with server momentum",
            f"2 x {MODEL} (sum, velocity)", "Hsu et al. 2019, arXiv:1909.06335",
        ),
        StrategyInfo(
            "fedadam", FedAdamOptions, _fedopt(Adaptivity.ADAM), "Adam on the server",
            f"3 x {MODEL} (sum, m, v)", "Reddi et al. 2021, arXiv:2003.00295",
        ),
        StrategyInfo(
            "fedyogi", FedAdamOptions, _fedopt(Adaptivity.YOGI), "Yogi on the server",
            f"3 x {MODEL} (sum, m, v)", "Reddi et al. 2021, arXiv:2003.00295",
        ),
        StrategyInfo(
            "fedadagrad", FedAdagradOptions, _fedopt(Adaptivity.ADAGRAD),
            "Adagrad on the server", f"3 x {MODEL} (sum, m, v)",
            "Reddi et al. 2021, arXiv:2003.00295",
        ),
        StrategyInfo(
            "median", RobustOptions, _robust("median", lambda o: Median()),
            "coordinate-wise median", "K x block + staged uploads",
            "Yin et al. 2018, arXiv:1803.01498",
        ),
        StrategyInfo(
            "trimmed-mean", TrimmedMeanOptions,
            _robust("trimmed-mean", lambda o: TrimmedMean(o.beta)),
            "coordinate-wise mean without the beta fraction at each end",
            "K x block + staged uploads", "Yin et al. 2018, arXiv:1803.01498",
        ),
        StrategyInfo(
            "krum", KrumOptions, _robust("krum", lambda o: Krum(o.f, 1, "krum")),
            "the upload closest to its K - f - 2 nearest others",
            "K x block + K^2 + staged uploads", "Blanchard et al. 2017 (NeurIPS)",
        ),
        StrategyInfo(
            "multi-krum", MultiKrumOptions,
            _robust("multi-krum", lambda o: Krum(o.f, o.m, "multi-krum")),
            "mean of the m best Krum scores", "K x block + K^2 + staged uploads",
            "Blanchard et al. 2017 (NeurIPS)",
        ),
        StrategyInfo(
            "bulyan", KrumOptions, _robust("bulyan", lambda o: Bulyan(o.f)),
            "K - 2f picked by Krum, then the mean of the values nearest the median",
            "K x block + K^2 + staged uploads", "El Mhamdi et al. 2018, arXiv:1802.07927",
        ),
    )
}
# Flower's names for the same rules.
ALIASES = {"fedmedian": "median", "fedtrimmedavg": "trimmed-mean"}
NOT_YET = {
    "scaffold": "it needs control variates to travel with the model (named tensor groups "
    "in the round plan); its server math is in fedstream.server.strategies.scaffold",
}


def _describe(error: pydantic.ValidationError, strategy: str, options: type[Options]) -> str:
    problems = []
    for item in error.errors():
        option = ".".join(str(part) for part in item["loc"])
        if item["type"] == "extra_forbidden":
            problems.append(
                f"no option {option!r} (its options: {', '.join(sorted(options.model_fields))})"
            )
        elif option:
            problems.append(f"option {option!r}: {item['msg']} (got {item['input']!r})")
        else:
            problems.append(str(item["msg"]).removeprefix("Value error, "))
    return f"strategy {strategy!r}: " + "; ".join(problems)


def build_strategy(name: str, options: Mapping[str, OptionValue] | None = None) -> Strategy:
    """The strategy called ``name`` with ``options`` checked; StrategyError names a bad one."""
    key = ALIASES.get(name, name)
    if key in NOT_YET:
        raise StrategyError(f"strategy {name!r} is not available yet: {NOT_YET[key]}")
    info = STRATEGIES.get(key)
    if info is None:
        raise StrategyError(
            f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}"
        )
    try:
        parsed = info.options.model_validate(dict(options or {}))
    except pydantic.ValidationError as error:
        raise StrategyError(_describe(error, key, info.options)) from None
    return info.build(parsed)


def parse_strategy_options(pairs: Iterable[str]) -> dict[str, str]:
    """``["eta=0.01", "beta1=0.9"]`` (repeated ``--strategy-opt``) as a mapping."""
    options: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise StrategyError(f"strategy option {pair!r} is not of the form key=value")
        if key in options:
            raise StrategyError(f"strategy option {key!r} is given twice")
        options[key] = value.strip()
    return options
