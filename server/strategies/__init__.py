"""Aggregation strategies: how a round's uploads become the next global model.

A :class:`~fedstream.server.strategies.base.Strategy` configures each client's round
(``configure``), aggregates the round's staged uploads (``begin_round`` -> ``accept`` ...
-> ``finish``), reports aggregated client metrics and checkpoints its state. Pick one with
:func:`~fedstream.server.strategies.registry.build_strategy`.

=============  ==========================================  ===============================
module         what                                        paper
=============  ==========================================  ===============================
base           the interface, StagedUpload protocol
composite      reduction + server optimizer = a strategy
fedavg         streaming weighted mean (fedavg, fedprox)   McMahan 2017, Li 2020
optimizers     sgd, momentum, adagrad, adam, yogi          Hsu 2019, Reddi 2021
robust         median, trimmed-mean, krum, multi-krum,     Yin 2018, Blanchard 2017,
               bulyan, block by block over staged uploads  El Mhamdi 2018
privacy        central DP (clip, noise, adaptive clip),    McMahan 2018, Andrew 2021
               local DP helper
scaffold       control-variate math (not on the wire yet)  Karimireddy 2020
staged         adapters onto the StagedUpload protocol
registry       names, options, build_strategy
=============  ==========================================  ===============================

Design notes: two later capabilities and where they plug in
------------------------------------------------------------

**Asynchronous buffered aggregation (FedBuff**, Nguyen et al. 2022, "Federated Learning
with Buffered Asynchronous Aggregation", AISTATS, arXiv:2106.06639). Uploads arrive
against older model versions; each is folded with a staleness weight and the server steps
every M uploads. It needs no new interface, only a second round loop:

- the asynchronous loop keeps one aggregator open at a time instead of one per round:
  ``aggregator = strategy.begin_round(version, manifest)``;
- a :class:`Reduction` ``BufferedMean`` folds ``s(staleness) * upload`` with
  ``s(tau) = 1 / sqrt(1 + tau)``; the staleness is ``version - upload's base version``,
  which the StagedUpload gains as one more property (the loop knows which model version
  it sent each client); ``take`` folds and releases, so memory stays one model;
- after M accepted uploads the loop calls ``aggregator.finish(global_state)``: the same
  server optimizers step (FedBuff uses plain SGD with a server learning rate; FedAdam etc.
  work unchanged), the version is bumped and a new aggregator is begun.

Robust rules can run buffered too (they keep M staged uploads instead of K).

**Secure aggregation** (Bonawitz et al. 2017, "Practical Secure Aggregation for
Privacy-Preserving Machine Learning", CCS). Each client uploads its weighted delta plus
pairwise masks that cancel in the sum; the server may only ever see the sum. In this
interface:

- ``configure`` hands each client its round's peer list and key-agreement material in the
  config map;
- a ``MaskedSumReduction`` adds uploads in a wide *integer* ring (fixed-point encoded
  values modulo 2^k, where masks cancel exactly; float addition would not) and releases
  each at once; at the close, when some clients dropped, it asks the survivors for the
  unmasking shares (a second exchange group in the round plan) and removes the dropped
  clients' masks from the sum before decoding;
- ``reduce`` emits the decoded sum divided by the total weight, block by block, to the
  same server optimizers. Weights must then be part of the masked payload (clients upload
  ``n_k * delta_k`` and ``n_k``), since the server cannot weight what it cannot see.

Rules that need individual updates (median, Krum, Bulyan, per-client DP clipping) are
incompatible with masking by construction; central DP composes with it only as
distributed noise added by the clients (each adds N(0, sigma^2 C^2 / K)).
"""

from fedstream.server.strategies.base import (
    ClientReport,
    RoundAggregator,
    RoundOutcome,
    StagedUpload,
    Strategy,
    StrategyError,
)
from fedstream.server.strategies.registry import (
    STRATEGIES,
    build_strategy,
    parse_strategy_options,
)
from fedstream.server.strategies.staged import InMemoryUpload, ReceiverUpload

__all__ = [
    "STRATEGIES",
    "ClientReport",
    "InMemoryUpload",
    "ReceiverUpload",
    "RoundAggregator",
    "RoundOutcome",
    "StagedUpload",
    "Strategy",
    "StrategyError",
    "build_strategy",
    "parse_strategy_options",
]
