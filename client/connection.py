"""gRPC adapter of the client: join, receive rounds, upload deltas, survive reconnects.

Each Join is one attempt that fails fast when the server cannot be reached; the caller
retries with capped exponential backoff for up to ``connect_timeout_s`` and logs every
retry with its cause (:meth:`ServerConnection.failure_cause` reads gRPC's error details
to tell a refused connection from a TLS or certificate mistake). The client id is fixed
for the life of the process, so a client that reconnects is the same client to the
server, never a second one.
"""

from __future__ import annotations

import asyncio
import logging
import random
import zlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import grpc
import torch
from fedstream.client.credential import CredentialKeeper, default_state_dir
from fedstream.client.settings import ClientSettings, split_host_port
from fedstream.client.trainer import LocalEvaluation, LocalUpdate
from fedstream.common import wire
from fedstream.common.codec import Manifest, PayloadAssembler, iter_payload
from fedstream.common.errors import ManifestError, TransferError
from fedstream.common.messages import (
    CREDENTIAL_METADATA_KEY,
    PROTOCOL_VERSION,
    EvaluationResult,
    FailureReport,
    FinishKind,
    RoundPlan,
    RunSpec,
    UpdateHeader,
)
from fedstream.common.pb import fedstream_pb2 as pb
from fedstream.common.pb import fedstream_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 4 << 20
JOIN_ATTEMPT_TIMEOUT_S = 30.0  # one Join: a server that accepts but never answers is down
REPORT_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Joined:
    client_id: str
    run: RunSpec
    partition_index: int


@dataclass(frozen=True)
class RoundEvent:
    plan: RoundPlan
    global_state: dict[str, torch.Tensor]


@dataclass(frozen=True)
class FinishEvent:
    reason: str
    kind: FinishKind


class Backoff:
    """Capped exponential delays with full jitter (AWS architecture blog, 2015)."""

    def __init__(self, initial_s: float, max_s: float, rng: random.Random | None = None) -> None:
        self.initial_s, self.max_s = initial_s, max_s
        self.attempt = 0
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        ceiling = min(self.max_s, self.initial_s * (2**self.attempt))
        self.attempt += 1
        return self._rng.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.attempt = 0


class ServerConnection:
    def __init__(
        self, settings: ClientSettings, client_id: str, keeper: CredentialKeeper | None = None
    ) -> None:
        self.settings = settings
        self.client_id = client_id
        if keeper is None:
            # Only a chosen id outlives the process; an automatic one is new every start.
            state_dir = settings.state_dir or default_state_dir()
            path = None if settings.client_id is None else state_dir / f"{client_id}.json"
            keeper = CredentialKeeper(settings.server, path)
        self.credential = keeper
        options: list[tuple[str, int | str]] = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.initial_reconnect_backoff_ms", int(settings.backoff_initial_s * 1000)),
            ("grpc.min_reconnect_backoff_ms", int(settings.backoff_initial_s * 1000)),
            ("grpc.max_reconnect_backoff_ms", int(settings.backoff_max_s * 1000)),
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.keepalive_timeout_ms", 10_000),
        ]
        if settings.tls_ca is None:
            self.channel = grpc.aio.insecure_channel(settings.server, options=options)
        else:
            if settings.tls_server_name:
                options.append(("grpc.ssl_target_name_override", settings.tls_server_name))
            credentials = grpc.ssl_channel_credentials(
                root_certificates=settings.tls_ca.read_bytes(),
                private_key=None if settings.tls_key is None else settings.tls_key.read_bytes(),
                certificate_chain=(
                    None if settings.tls_cert is None else settings.tls_cert.read_bytes()
                ),
            )
            self.channel = grpc.aio.secure_channel(settings.server, credentials, options=options)
        token = settings.read_token()
        self._token_metadata: tuple[tuple[str, str], ...] = (
            () if token is None else (("authorization", f"Bearer {token}"),)
        )
        self.stub = pb_grpc.FederationStub(self.channel)
        self._pin = settings.gpu is not None
        self._last_buffer: torch.Tensor | None = None

    async def close(self) -> None:
        await self.channel.close()

    @property
    def _metadata(self) -> tuple[tuple[str, str], ...]:
        secret = self.credential.secret
        if secret is None:
            return self._token_metadata
        return (*self._token_metadata, (CREDENTIAL_METADATA_KEY, secret))

    async def join(
        self, partition_index: int | None = None, timeout_s: float = JOIN_ATTEMPT_TIMEOUT_S
    ) -> Joined:
        """Register with the server: one attempt, UNAVAILABLE at once when it is down."""
        request = pb.JoinRequest(client_id=self.client_id, protocol_version=PROTOCOL_VERSION)
        if partition_index is not None:
            request.partition_index = partition_index
        reply = await self.stub.Join(
            request, timeout=min(timeout_s, JOIN_ATTEMPT_TIMEOUT_S), metadata=self._metadata
        )
        if reply.credential:
            # A first Join (or a server that no longer knew this id): the secret that
            # proves this id from now on.
            self.credential.store(reply.credential)
        return Joined(reply.client_id, wire.run_spec_from_pb(reply.run), reply.partition_index)

    def failure_cause(self, error: grpc.aio.AioRpcError) -> str:
        """Why a call failed, in the operator's terms (a TLS mistake is not a down server).

        gRPC reports every failure to connect as UNAVAILABLE; what went wrong is only in
        its details text, so this matches the phrases gRPC core and BoringSSL use.
        """
        s, details = self.settings, error.details() or ""
        host, _ = split_host_port(s.server)
        if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            return "no answer in time (the server accepts connections but does not respond)"
        if "resolving" in details or "Domain name not found" in details:
            return f"host {host!r} does not resolve (DNS)"
        if "Connection refused" in details:
            return f"connection refused: nothing listens on {s.server}"
        if "Hostname Verification" in details or "No match found for server name" in details:
            name = s.tls_server_name or host
            return (
                f"TLS: the server's certificate does not name {name!r} (name mismatch; set "
                "--tls-server-name to a name the certificate holds)"
            )
        if "CERTIFICATE_VERIFY_FAILED" in details:
            if "expired" in details:
                return "TLS: the server's certificate has expired"
            return (
                f"TLS: the server's certificate is not signed by a CA in --tls-ca {s.tls_ca} "
                "(unknown CA)"
            )
        if "WRONG_VERSION_NUMBER" in details:
            return (
                "TLS: the server does not speak TLS (leave out --tls-ca, or start fl-server "
                "with --tls-cert and --tls-key)"
            )
        if "failed to connect" in details and "Socket closed" in details:
            # The server hung up during the handshake; BoringSSL tells only the server why.
            if s.tls_ca is None:
                return (
                    "the server closed the connection at once: it may serve TLS only "
                    "(pass --tls-ca)"
                )
            if s.tls_cert is None:
                return (
                    "the server closed the connection during the TLS handshake: it may "
                    "require a client certificate (mutual TLS: pass --tls-cert and --tls-key)"
                )
            return (
                "the server closed the connection during the TLS handshake: it may not "
                "trust this client's certificate (--tls-cert)"
            )
        return f"{error.code().name}: {details}"

    async def rounds(self, expected: Manifest) -> AsyncIterator[RoundEvent | FinishEvent]:
        """Yield each round's task with the received global weights, then Finish.

        ``expected`` is this client's own model: a RoundStart whose manifest differs from
        it is refused before anything is allocated for it, since a server may declare any
        size. Messages that bring no new bytes (empty chunks, messages of no known kind)
        are not progress: after ``download_stall_timeout_s`` without progress the stream
        is refused. A silent stream is left alone: an idle server sends nothing.
        """
        call = self.stub.WatchRounds(
            pb.WatchRequest(client_id=self.client_id), metadata=self._metadata
        )
        stall_s = self.settings.download_stall_timeout_s
        clock = asyncio.get_running_loop().time
        last_progress = clock()
        task: RoundPlan | None = None
        assembler: PayloadAssembler | None = None
        try:
            async for message in call:
                kind = message.WhichOneof("kind")
                progress = True
                if kind == "round_start":
                    task = wire.round_start_from_pb(message.round_start)
                    difference = expected.describe_difference(task.manifest)
                    if difference is not None:
                        raise ManifestError(
                            f"round {task.round}: the server's model does not match this "
                            f"client's model ({difference}); refused before allocating"
                        )
                    # Rounds are handled one at a time: by the next RoundStart the trainer
                    # has copied the last model out, so its buffer can take the next one.
                    assembler = PayloadAssembler(
                        task.manifest, pin_memory=self._pin, reuse=self._last_buffer
                    )
                    self._last_buffer = assembler.buffer
                elif kind == "chunk":
                    if assembler is None:
                        raise TransferError("model chunk before RoundStart")
                    assembler.add(message.chunk.data)
                    progress = bool(message.chunk.data)
                elif kind == "end":
                    if task is None or assembler is None:
                        raise TransferError("TransferEnd before RoundStart")
                    state = assembler.finish(message.end.total_bytes, message.end.crc32)
                    yield RoundEvent(task, state)
                    task, assembler = None, None
                elif kind == "finish":
                    yield FinishEvent(
                        message.finish.reason, wire.finish_kind_from_pb(message.finish)
                    )
                    return
                else:
                    progress = False
                now = clock()
                if progress:
                    last_progress = now
                elif now - last_progress > stall_s:
                    raise TransferError(
                        f"no progress for {stall_s:g}s: the server sends messages that carry "
                        "no model bytes (--download-stall-timeout-s)"
                    )
        finally:
            call.cancel()

    async def push_update(self, update: LocalUpdate) -> None:
        """Stream one delta under its plan id; returns once the server folded it."""
        manifest = Manifest.of(update.delta)
        header = UpdateHeader(
            self.client_id, update.round, update.num_examples, manifest, update.report,
            plan_id=update.plan_id, metrics=update.metrics,
        )

        def messages() -> Iterator[pb.UpdateMessage]:
            yield wire.update_header_to_pb(header)
            crc, sent = 0, 0
            for chunk in iter_payload(update.delta, manifest, self.settings.chunk_size_bytes):
                crc = zlib.crc32(chunk, crc)
                sent += len(chunk)
                yield pb.UpdateMessage(chunk=pb.Chunk(data=chunk))
            yield pb.UpdateMessage(end=pb.TransferEnd(total_bytes=sent, crc32=crc))

        # No wait_for_ready: a server that is gone fails the upload at once (the caller
        # retries), instead of holding the client until it comes back.
        await self.stub.PushUpdate(messages(), metadata=self._metadata)

    async def submit_evaluation(self, evaluation: LocalEvaluation) -> None:
        result = EvaluationResult(
            self.client_id, evaluation.round, evaluation.plan_id, evaluation.num_examples,
            evaluation.metrics,
        )
        await self.stub.SubmitEvaluation(
            wire.evaluation_to_pb(result), metadata=self._metadata, timeout=REPORT_TIMEOUT_S
        )

    async def report_failure(self, plan_id: str, reason: str, leaving: bool = False) -> None:
        """Tell the server why this client fails a plan or leaves; best effort."""
        report = FailureReport(self.client_id, plan_id, reason, leaving)
        try:
            await self.stub.ReportFailure(
                wire.failure_to_pb(report), metadata=self._metadata, timeout=REPORT_TIMEOUT_S
            )
        except grpc.aio.AioRpcError as error:
            log.debug("could not report the failure to the server: %s", error.code().name)

