"""``fl-client``: parse flags -> ClientSettings -> take part in rounds until told to finish."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Sequence

import grpc
import torch
from fedstream.client.connection import Backoff, FinishEvent, ServerConnection
from fedstream.client.device import configure_threads, select_device
from fedstream.client.settings import ENV_PREFIX, ClientSettings
from fedstream.client.trainer import LocalUpdate, TaskRunner
from fedstream.common.config import add_flags, parse_into
from fedstream.common.errors import ConfigError, ManifestError, TaskError, TransferError
from fedstream.common.logs import setup_logging
from fedstream.common.messages import FinishKind, PlanKind, RoundPlan
from fedstream.common.version import version_line

log = logging.getLogger("fedstream.client")

# Codes after which reconnecting can help: the server went away or restarted.
RECONNECT_CODES = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.INTERNAL,
}
UPLOAD_ATTEMPTS = 3

# Exit statuses (README, "fl-client"): 0 run complete, 1 server unreachable or refused
# this client, 2 invalid setting or a task that does not match the server's, 3 the
# server broke the protocol too often, 130 signal.
EXIT_SETTINGS = 2
EXIT_PROTOCOL = 3


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fl-client",
        description="fedstream client: receives the global model each round, trains on its "
        "own data on its own device, and streams its weight delta back.",
    )
    parser.add_argument("--config", help="TOML file with settings (flags and FL_CLIENT_* win)")
    parser.add_argument("--version", action="version", version=version_line("fl-client"))
    add_flags(parser, ClientSettings, renames={"connect_timeout_s": "--connect-timeout"})
    return parser


async def _upload(connection: ServerConnection, update: LocalUpdate, settings: ClientSettings
                  ) -> None:
    """Upload with retries on a broken connection; a duplicate means an earlier try landed."""
    backoff = Backoff(settings.backoff_initial_s, settings.backoff_max_s)
    round_number = update.round
    for attempt in range(1, UPLOAD_ATTEMPTS + 1):
        try:
            await connection.push_update(update)
            log.info("round %d: upload accepted", round_number)
            return
        except grpc.aio.AioRpcError as error:
            code = error.code()
            if code == grpc.StatusCode.ALREADY_EXISTS:
                log.info("round %d: upload had already landed", round_number)
                return
            # Only a connection that never carried the upload is worth a retry: gRPC's
            # asyncio client may report a server's early refusal as INTERNAL, and
            # resending the whole delta would not change the answer.
            if code == grpc.StatusCode.UNAVAILABLE and attempt < UPLOAD_ATTEMPTS:
                log.warning("round %d: upload failed (%s), retrying", round_number, code.name)
                await asyncio.sleep(backoff.next_delay())
                continue
            log.warning("round %d: upload refused: %s %s", round_number, code.name, error.details())
            return


def _shown(metrics: dict[str, float]) -> str:
    return "  ".join(
        f"{key} {value:.4f}" if not value.is_integer() else f"{key} {int(value)}"
        for key, value in sorted(metrics.items())
    )


async def _take_part(
    connection: ServerConnection,
    runner: TaskRunner,
    plan: RoundPlan,
    global_state: dict[str, torch.Tensor],
    settings: ClientSettings,
) -> None:
    """Run one plan (train or evaluate) and answer it; a task error fails this plan only."""
    try:
        if plan.kind is PlanKind.EVALUATE:
            evaluation = await asyncio.to_thread(runner.evaluate_round, plan, global_state)
            log.info("round %d: evaluated: %s", plan.round, _shown(evaluation.metrics))
            await connection.submit_evaluation(evaluation)
            return
        log.info("round %d: received global model, training", plan.round)
        update = await asyncio.to_thread(runner.train_round, plan, global_state)
    except TaskError as error:
        log.error("round %d: %s", plan.round, error)
        await connection.report_failure(plan.plan_id, str(error))
        return
    except Exception as error:
        # The task's own code crashed: say so to the server, then let the traceback show.
        await connection.report_failure(
            plan.plan_id, f"task crashed: {type(error).__name__}: {error}", leaving=True
        )
        raise
    log.info(
        "round %d: trained in %.2fs: %s",
        plan.round,
        update.report.train_finished_unix_s - update.report.train_started_unix_s,
        _shown(update.metrics),
    )
    await _upload(connection, update, settings)


async def run_client(settings: ClientSettings, stop: threading.Event | None = None) -> int:
    """Take part in rounds until the server finishes the run; returns the exit status.

    ``stop``, when set (on SIGTERM), makes the task's training return at its next step.
    """
    device = select_device(settings.gpu)
    threads = configure_threads(device, settings.num_threads)
    client_id = settings.client_id or f"{socket.gethostname()}-{os.getpid()}"
    log.info("client %s on %s (%d threads), server %s", client_id, device, threads, settings.server)
    connection = ServerConnection(settings, client_id)
    runner: TaskRunner | None = None
    # Reset only by a verified download, never by a mere Join: a server that accepts every
    # Join and then sends garbage must not be retried at full speed.
    backoff = Backoff(settings.backoff_initial_s, settings.backoff_max_s)
    protocol_errors = 0
    clock = asyncio.get_running_loop().time
    unreachable_since: float | None = None  # the first failed call since the last Join
    try:
        while True:
            joining = True
            try:
                hint = settings.partition_index if runner is None else runner.partition.index
                waited = 0.0 if unreachable_since is None else clock() - unreachable_since
                joined = await connection.join(hint, settings.connect_timeout_s - waited)
                unreachable_since, joining = None, False
                if runner is None:
                    try:
                        built: TaskRunner = await asyncio.to_thread(
                            TaskRunner, settings, joined.run, joined.partition_index, device
                        )
                    except (TaskError, ConfigError) as error:
                        log.error("cannot take part: %s", error)
                        await connection.report_failure("", str(error), leaving=True)
                        return EXIT_SETTINGS
                    if stop is not None:
                        built.stop = stop
                    runner = built
                active: TaskRunner = runner
                async for event in connection.rounds(active.manifest):
                    backoff.reset()
                    protocol_errors = 0
                    if isinstance(event, FinishEvent):
                        if event.kind is FinishKind.RUN_COMPLETE:
                            log.info("server finished the run: %s", event.reason)
                            return 0
                        if event.kind is FinishKind.REPLACED:
                            log.error(
                                "another connection took over client id %s (%s); exiting",
                                client_id,
                                event.reason,
                            )
                            return 1
                        # Stopped before the run is complete: wait for the server (a
                        # restart resumes from its checkpoint) within --connect-timeout.
                        log.warning(
                            "server stopping before the run is complete (%s); waiting up to "
                            "%gs for it to come back",
                            event.reason,
                            settings.connect_timeout_s,
                        )
                        unreachable_since = clock()
                        break
                    await _take_part(connection, active, event.plan, event.global_state, settings)
                else:
                    log.warning("round stream ended without Finish; reconnecting")
            except (TransferError, ManifestError) as error:
                protocol_errors += 1
                if protocol_errors >= settings.max_protocol_errors:
                    log.error(
                        "giving up: %d refused transfers in a row from server %s (last: %s; "
                        "--max-protocol-errors)",
                        protocol_errors,
                        settings.server,
                        error,
                    )
                    return EXIT_PROTOCOL
                log.warning(
                    "model download refused (%d of %d in a row): %s; reconnecting",
                    protocol_errors,
                    settings.max_protocol_errors,
                    error,
                )
            except grpc.aio.AioRpcError as error:
                if error.code() not in RECONNECT_CODES:
                    log.error(
                        "server refused this client: %s %s", error.code().name, error.details()
                    )
                    return 1
                cause = connection.failure_cause(error)
                now = clock()
                unreachable_since = now if unreachable_since is None else unreachable_since
                delay = backoff.next_delay()
                if now + delay - unreachable_since > settings.connect_timeout_s:
                    log.error(
                        "server %s unreachable for %gs; giving up (--connect-timeout; last "
                        "cause: %s)",
                        settings.server,
                        settings.connect_timeout_s,
                        cause,
                    )
                    return 1
                log.warning(
                    "%s server %s: %s; retrying in %.1fs",
                    "cannot join" if joining else "connection lost to",
                    settings.server,
                    cause,
                    delay,
                )
                await asyncio.sleep(delay)
                continue
            await asyncio.sleep(backoff.next_delay())
    finally:
        await connection.close()


async def _main(settings: ClientSettings) -> int:
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    stop = threading.Event()

    def on_signal() -> None:
        stop.set()  # training returns at its next step, so the thread does not linger
        if task is not None:
            task.cancel()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal)
    try:
        return await run_client(settings, stop)
    except asyncio.CancelledError:
        log.warning("stopping on signal")
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = parse_into(build_parser(), ClientSettings, ENV_PREFIX, argv)
        select_device(settings.gpu)  # a GPU that does not exist is an error before any work
    except ConfigError as error:
        print(f"fl-client: {error}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level, f"client[{settings.client_id or os.getpid()}]")
    try:
        return asyncio.run(_main(settings))
    except (ConfigError, TaskError) as error:
        log.error("%s", error)
        return 2


if __name__ == "__main__":
    sys.exit(main())
