"""``fl-server``: parse flags -> ServerSettings -> serve until the last round ends."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import logging
import signal
import sys
from collections.abc import Mapping, Sequence

import grpc
import torch
from fedstream.common.config import add_flags, parse_into
from fedstream.common.data import Splits, load_dataset
from fedstream.common.errors import ConfigError, RoundFailed
from fedstream.common.logs import setup_logging
from fedstream.common.messages import FinishKind, RunSpec, TrainConfig
from fedstream.common.models import build_model
from fedstream.common.training import evaluate
from fedstream.server.auth import TokenTable, server_credentials
from fedstream.server.checkpoint import (
    CHECKPOINT_NAME,
    MetricsLog,
    load_checkpoint,
    save_checkpoint,
)
from fedstream.server.coordinator import (
    Coordinator,
    CoordinatorConfig,
    RoundSummary,
    summary_record,
)
from fedstream.server.servicer import SERVICE_NAME, FederationServicer, add_to_server
from fedstream.server.settings import ENV_PREFIX, ServerSettings
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

log = logging.getLogger("fedstream.server")

MAX_MESSAGE_BYTES = 4 << 20  # gRPC's default, kept as a guard rail: chunks are ~1 MiB
GRACE_S = 5.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fl-server",
        description="fedstream aggregation server: streams the global model to clients, "
        "folds their deltas into a FedAvg sum, evaluates and checkpoints every round.",
    )
    parser.add_argument("--config", help="TOML file with settings (flags and FL_SERVER_* win)")
    add_flags(
        parser,
        ServerSettings,
        renames={"round_timeout_s": "--round-timeout", "join_timeout_s": "--join-timeout"},
    )
    return parser


def channel_options() -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        # Detect peers that vanished without closing the connection (a machine lost power).
        ("grpc.keepalive_time_ms", 20_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


class Run:
    """What one training run needs besides round state: data, evaluation and output."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.data: Splits | None = None
        self.model: torch.nn.Module | None = None
        self.metrics = MetricsLog(settings.out)

    def initial_state(self) -> dict[str, torch.Tensor]:
        s = self.settings
        self.data = load_dataset(s.dataset, s.data_dir, s.download, s.seed, s.test_fraction)
        self.model = build_model(s.model, self.data.input_shape, self.data.num_classes, s.seed)
        # The global state is the model's own tensors, not a copy: a second copy was a
        # whole extra model of server memory (benchmarks B4/B5). Evaluation loads the
        # state into the same tensors, a no-op. A tensor aliasing an earlier one (tied
        # weights) is copied, so that every name is updated once per round.
        state: dict[str, torch.Tensor] = {}
        seen: set[int] = set()
        for name, tensor in self.model.state_dict().items():
            pointer = tensor.untyped_storage().data_ptr()
            state[name] = tensor.detach().clone() if pointer in seen else tensor.detach()
            seen.add(pointer)
        return state

    def resume_point(self, state: dict[str, torch.Tensor]) -> int:
        """The first round to run: 1, or the round after the checkpoint in --out.

        On resume ``state`` is overwritten in place with the checkpoint's weights and the
        metrics log is cut back to the checkpoint's round, so a round that was logged but
        not checkpointed before a crash is run again and logged once.
        """
        s = self.settings
        path = s.out / CHECKPOINT_NAME
        if not path.exists():
            return 1
        if not s.resume:
            log.info("--no-resume: starting afresh, replacing %s", path)
            self.metrics.truncate(0)
            return 1
        round_number, meta, saved = load_checkpoint(path)
        for key in ("model", "dataset"):
            if meta.get(key) != getattr(s, key):
                raise ConfigError(
                    f"checkpoint {path} was trained with {key}={meta.get(key)!r}, this run uses "
                    f"{getattr(s, key)!r}; use another --out or --no-resume"
                )
        missing = state.keys() ^ saved.keys()
        if missing:
            raise ConfigError(f"checkpoint {path} does not fit the model: {sorted(missing)[:5]}")
        for name, tensor in saved.items():
            state[name].copy_(tensor)
        self.metrics.truncate(round_number)
        log.info("resuming after round %d from %s", round_number, path)
        return int(round_number) + 1

    def evaluate(self, state: Mapping[str, torch.Tensor]) -> tuple[float, float] | None:
        if not self.settings.evaluate or self.model is None or self.data is None:
            return None
        self.model.load_state_dict(state)
        loss, accuracy = evaluate(self.model, self.data, torch.device("cpu"))
        return loss, accuracy

    def on_round(self, summary: RoundSummary, state: Mapping[str, torch.Tensor]) -> None:
        s = self.settings
        record = summary_record(summary)
        # Metrics first: after a crash between the two, resuming cuts the log back to the
        # checkpoint's round, so no round is ever logged twice or lost.
        self.metrics.append(record)
        save_checkpoint(
            s.out, state, summary.round, {"model": s.model, "dataset": s.dataset, "seed": s.seed}
        )
        accuracy = "n/a" if summary.accuracy is None else f"{summary.accuracy:.4f}"
        log.info(
            "round %d/%d  clients %d/%d  train_loss %.4f  accuracy %s  time %.2fs",
            summary.round,
            s.rounds,
            summary.succeeded,
            summary.selected,
            summary.train_loss,
            accuracy,
            summary.wall_time_s,
        )


def coordinator_config(settings: ServerSettings) -> CoordinatorConfig:
    s = settings
    return CoordinatorConfig(
        rounds=s.rounds,
        min_clients=s.min_clients,
        clients_per_round=s.clients_per_round,
        round_timeout_s=s.round_timeout_s,
        join_timeout_s=s.join_timeout_s,
        round_retries=s.round_retries,
        server_lr=s.server_lr,
        chunk_size_bytes=s.chunk_size_bytes,
        spool_memory_bytes=s.spool_memory_bytes,
        spool_dir=s.spool_dir,
        seed=s.seed,
        max_clients=s.max_clients,
        max_num_examples=s.max_num_examples,
        max_update_abs=s.max_update_abs,
        train=TrainConfig(
            local_epochs=s.local_epochs,
            batch_size=s.batch_size,
            learning_rate=s.learning_rate,
            optimizer=s.optimizer,
            momentum=s.momentum,
            weight_decay=s.weight_decay,
        ),
        run=RunSpec(
            model=s.model,
            dataset=s.dataset,
            seed=s.seed,
            test_fraction=s.test_fraction,
            num_partitions=s.partitions,
            partition=s.partition,
            dirichlet_alpha=s.dirichlet_alpha,
        ),
    )


async def start_server(
    coordinator: Coordinator,
    host: str,
    port: int,
    credentials: grpc.ServerCredentials | None = None,
    tokens: TokenTable | None = None,
) -> tuple[grpc.aio.Server, int, health.aio.HealthServicer]:
    """Start the gRPC server for ``coordinator``; returns it with the bound port."""
    server = grpc.aio.server(options=channel_options())
    add_to_server(FederationServicer(coordinator, MAX_MESSAGE_BYTES, tokens), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    address = f"{host}:{port}"
    if credentials is None:
        bound = server.add_insecure_port(address)
    else:
        bound = server.add_secure_port(address, credentials)
    if bound == 0:
        raise ConfigError(f"cannot listen on {host}:{port}")
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server, bound, health_servicer


async def serve(settings: ServerSettings) -> int:
    run = Run(settings)
    state = await asyncio.to_thread(run.initial_state)
    first_round = await asyncio.to_thread(run.resume_point, state)
    coordinator = Coordinator(
        coordinator_config(settings), state, run.evaluate, run.on_round, first_round
    )
    credentials = None
    if settings.tls_cert is not None and settings.tls_key is not None:
        credentials = server_credentials(
            settings.tls_cert, settings.tls_key, settings.tls_client_ca
        )
    tokens = None if settings.token_file is None else TokenTable.from_file(settings.token_file)
    server, port, health_servicer = await start_server(
        coordinator, settings.host, settings.port, credentials, tokens
    )
    if credentials is None and not _is_loopback(settings.host):
        log.warning("listening on %s without TLS: traffic is not encrypted", settings.host)
    mb = coordinator.manifest.total_bytes / 1e6
    log.info(
        "listening on %s:%d (model %s, %.2f MB; dataset %s)",
        settings.host,
        port,
        settings.model,
        mb,
        settings.dataset,
    )

    if first_round > settings.rounds:
        log.info(
            "run already complete: %s holds round %d of %d (use --no-resume or another --out "
            "to train again)",
            settings.out,
            first_round - 1,
            settings.rounds,
        )
    loop = asyncio.get_running_loop()
    runner = asyncio.current_task()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, lambda: runner.cancel() if runner else None)
    code = 0
    try:
        summaries = await coordinator.run()
        final = summaries[-1] if summaries else None
        if final is not None and final.accuracy is not None:
            log.info("final accuracy %.4f after %d rounds", final.accuracy, final.round)
        log.info("checkpoint: %s  metrics: %s", settings.out / "checkpoint.pt", run.metrics.path)
    except RoundFailed as error:
        log.error("run failed: %s", error)
        code = 1
    except asyncio.CancelledError:
        log.warning("stopping on signal")
        coordinator.finish("server stopping on a signal", FinishKind.SERVER_STOPPING)
        code = 130
    finally:
        await health_servicer.enter_graceful_shutdown()
        with contextlib.suppress(asyncio.CancelledError):
            await _drain(coordinator)
            await server.stop(GRACE_S)
    return code


async def _drain(coordinator: Coordinator) -> None:
    """Give clients a moment to receive Finish so they can exit cleanly."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(GRACE_S):
            await coordinator.wait_all_told()


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = parse_into(build_parser(), ServerSettings, ENV_PREFIX, argv)
    except ConfigError as error:
        print(f"fl-server: {error}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level, "server")
    try:
        return asyncio.run(serve(settings))
    except ConfigError as error:
        log.error("%s", error)
        return 2


if __name__ == "__main__":
    sys.exit(main())
