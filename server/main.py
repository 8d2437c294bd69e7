"""``fl-server``: parse flags -> ServerSettings -> serve until the last round ends."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import logging
import shutil
import signal
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import grpc
import torch
from fedstream.common.config import add_flags, parse_into, parse_scalar
from fedstream.common.errors import ConfigError, RoundFailed, TaskError
from fedstream.common.logs import setup_logging
from fedstream.common.messages import FinishKind, RunSpec, Scalar
from fedstream.common.records import MetricGoal, StopRule
from fedstream.common.task import (
    BUILTIN_TASK,
    Context,
    Partition,
    Task,
    build_seeded,
    checked_metrics,
    exchanged_state,
    fingerprint,
    load_exchanged,
    load_task,
)
from fedstream.common.version import version_line
from fedstream.server.auth import TokenTable, server_credentials
from fedstream.server.checkpoint import (
    CHECKPOINT_NAME,
    load_checkpoint,
    save_checkpoint,
)
from fedstream.server.coordinator import (
    Coordinator,
    CoordinatorConfig,
    RoundSummary,
    summary_record,
)
from fedstream.server.run_records import RunRecords
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
    parser.add_argument("--version", action="version", version=version_line("fl-server"))
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


def server_task(settings: ServerSettings) -> Task:
    """The task the settings name; the built-in one takes --model, --dataset and friends."""
    s = settings
    options: dict[str, Scalar] = {k: parse_scalar(v) for k, v in s.task_opt.items()}
    if s.task == BUILTIN_TASK:
        options = {
            "model": s.model,
            "dataset": s.dataset,
            "data_dir": str(s.data_dir),
            "download": s.download,
            "seed": s.seed,
            "test_fraction": s.test_fraction,
            "partition": s.partition,
            "dirichlet_alpha": s.dirichlet_alpha,
            **options,
        }
    return load_task(s.task, options)


def round_config(settings: ServerSettings) -> dict[str, Scalar]:
    """The config map every selected client gets each round."""
    s = settings
    config: dict[str, Scalar] = {
        "local_epochs": s.local_epochs,
        "batch_size": s.batch_size,
        "learning_rate": s.learning_rate,
        "optimizer": s.optimizer,
        "momentum": s.momentum,
        "weight_decay": s.weight_decay,
    }
    config.update({k: parse_scalar(v) for k, v in s.round_config.items()})
    return config


class Run:
    """What one training run needs besides round state: the task, evaluation, output."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.task = server_task(settings)
        self.data: Any = None
        self.model: torch.nn.Module | None = None
        self.fingerprint = ""
        self.stop_rule = None if settings.stop_when is None else StopRule.parse(settings.stop_when)
        goal = None if settings.save_best is None else MetricGoal.parse(settings.save_best)
        self.records = RunRecords(settings.out, goal)
        self.metrics = self.records.metrics

    def initial_state(self) -> dict[str, torch.Tensor]:
        s = self.settings
        self.model = build_seeded(self.task, s.seed, server=True)
        exchanged = exchanged_state(self.task, self.model)
        self.fingerprint = fingerprint(self.task, self.model, exchanged)
        everything = self.model.state_dict()
        log.info(
            "task %s: %d of %d tensors travel each way (%.3f MB of the model's %.3f MB)",
            self.task.name, len(exchanged), len(everything),
            sum(t.nbytes for t in exchanged.values()) / 1e6,
            sum(t.nbytes for t in everything.values()) / 1e6,
        )
        if s.evaluate:
            self.data = self.task.server_data()
        # The global state is the model's own tensors, not a copy: a second copy was a
        # whole extra model of server memory (benchmarks B4/B5). Evaluation loads the
        # state into the same tensors, a no-op. A tensor aliasing an earlier one (tied
        # weights) is copied, so that every name is updated once per round.
        state: dict[str, torch.Tensor] = {}
        seen: set[int] = set()
        for name, tensor in exchanged.items():
            pointer = tensor.untyped_storage().data_ptr()
            state[name] = tensor.detach().clone() if pointer in seen else tensor.detach()
            seen.add(pointer)
        return state

    def run_spec(self) -> RunSpec:
        s = self.settings
        return RunSpec(
            model=s.model,
            dataset=s.dataset,
            seed=s.seed,
            test_fraction=s.test_fraction,
            num_partitions=s.partitions,
            partition=s.partition,
            dirichlet_alpha=s.dirichlet_alpha,
            task=s.task,
            task_options=dict(s.task_opt),
            task_fingerprint=self.fingerprint,
        )

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
        expected = self.checkpoint_meta()
        for key in ("task", "model", "dataset", "fingerprint"):
            if key in meta and meta.get(key) != expected[key]:
                raise ConfigError(
                    f"checkpoint {path} was trained with {key}={meta.get(key)!r}, this run uses "
                    f"{expected[key]!r}; use another --out or --no-resume"
                )
        missing = state.keys() ^ saved.keys()
        if missing:
            raise ConfigError(f"checkpoint {path} does not fit the model: {sorted(missing)[:5]}")
        for name, tensor in saved.items():
            state[name].copy_(tensor)
        self.metrics.truncate(round_number)
        self.records.resume(round_number)
        log.info("resuming after round %d from %s", round_number, path)
        return int(round_number) + 1

    def checkpoint_meta(self) -> dict[str, Any]:
        s = self.settings
        return {"task": s.task, "model": s.model, "dataset": s.dataset, "seed": s.seed,
                "fingerprint": self.fingerprint}

    def evaluate(self, state: Mapping[str, torch.Tensor]) -> dict[str, float] | None:
        if not self.settings.evaluate or self.model is None or self.data is None:
            return None
        load_exchanged(self.model, state)
        ctx = Context(
            round=0,
            config=round_config(self.settings),
            device=torch.device("cpu"),
            seed=self.settings.seed,
            partition=Partition(0, 1, self.settings.seed),
        )
        metrics = self.task.server_evaluate(self.model, self.data, ctx)
        _, clean = checked_metrics(metrics, f"task {self.task.name!r} server_evaluate",
                                   need_examples=False)
        result: dict[str, float] = clean
        return result

    def on_round(self, summary: RoundSummary, state: Mapping[str, torch.Tensor]) -> bool:
        """Record a completed round; True when the stop rule is met."""
        s = self.settings
        record = summary_record(summary)
        # Metrics first: after a crash between the two, resuming cuts the log back to the
        # checkpoint's round, so no round is ever logged twice or lost.
        self.metrics.append(record)
        save_checkpoint(s.out, state, summary.round, self.checkpoint_meta())
        self.records.after_checkpoint(record)
        log.info(
            "round %d/%d  clients %d/%d  %s  time %.2fs",
            summary.round,
            s.rounds,
            summary.succeeded,
            summary.selected,
            _shown(record),
            summary.wall_time_s,
        )
        if self.stop_rule is not None and self.stop_rule.met(record):
            log.info("round %d meets --stop-when %s: ending the run", summary.round,
                     self.stop_rule)
            return True
        return False


def _shown(record: Mapping[str, Any]) -> str:
    """The round's metrics for the log line: train, server eval, federated eval."""
    parts = []
    for section, label in (("train", "train"), ("server_eval", "eval"),
                           ("federated_eval", "fed-eval")):
        values = record.get(section) or {}
        shown = " ".join(
            f"{k} {v:.4f}" for k, v in sorted(values.items()) if k not in ("num_examples", "steps")
        )
        if shown:
            parts.append(f"{label} {shown}")
    return "  ".join(parts) or "no metrics"


def coordinator_config(settings: ServerSettings, run: RunSpec) -> CoordinatorConfig:
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
        run=run,
        round_config=round_config(s),
        evaluate_every=s.evaluate_every,
        fraction_evaluate=s.fraction_evaluate,
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
    created = not settings.out.exists()
    try:
        return await _serve(settings)
    except (ConfigError, TaskError):
        # A failed start leaves no empty run folder behind.
        if created and settings.out.is_dir() and not (settings.out / CHECKPOINT_NAME).exists():
            shutil.rmtree(settings.out, ignore_errors=True)
        raise


async def _serve(settings: ServerSettings) -> int:
    run = await asyncio.to_thread(Run, settings)
    state = await asyncio.to_thread(run.initial_state)
    first_round = await asyncio.to_thread(run.resume_point, state)
    run.records.write_run(settings, run.task, run.fingerprint)
    coordinator = Coordinator(
        coordinator_config(settings, run.run_spec()), state, run.evaluate, run.on_round,
        first_round, aggregate_metrics=run.task.aggregate_metrics,
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
    if settings.task == BUILTIN_TASK:
        what = f"model {settings.model}, {mb:.2f} MB each way; dataset {settings.dataset}"
    else:
        what = f"task {settings.task}, {mb:.2f} MB each way"
    log.info("listening on %s:%d (%s)", settings.host, port, what)

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
        elif final is not None:
            log.info("final metrics after %d rounds: %s", final.round,
                     _shown(summary_record(final)))
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
    except (ConfigError, TaskError) as error:
        log.error("%s", error)
        return 2


if __name__ == "__main__":
    sys.exit(main())
