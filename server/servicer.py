"""gRPC adapter of the coordinator: parse, validate, hand over, map errors to status codes.

Every refusal goes through :func:`status_for`, so each kind of bad input has one status
code and the log line names the client and round.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator

import grpc
from fedstream.common import wire
from fedstream.common.errors import FedstreamError, ManifestError, UploadRejected
from fedstream.common.messages import (
    CREDENTIAL_METADATA_KEY,
    PROTOCOL_VERSION,
    RoundPlan,
    UpdateHeader,
)
from fedstream.common.pb import fedstream_pb2 as pb
from fedstream.common.pb import fedstream_pb2_grpc as pb_grpc
from fedstream.server.auth import TokenTable, bearer_token, metadata_value
from fedstream.server.broadcast import Broadcast
from fedstream.server.coordinator import Coordinator, Finish, UploadTicket
from google.protobuf.message import DecodeError

log = logging.getLogger(__name__)

SERVICE_NAME = "fedstream.v1.Federation"
DRAIN_SLACK_BYTES = 4 << 20
DRAIN_TIMEOUT_S = 10.0

_STATUS_BY_REASON = {
    "malformed": grpc.StatusCode.INVALID_ARGUMENT,
    "non_finite": grpc.StatusCode.INVALID_ARGUMENT,
    "out_of_range": grpc.StatusCode.INVALID_ARGUMENT,
    "unknown_client": grpc.StatusCode.NOT_FOUND,
    "stale_round": grpc.StatusCode.FAILED_PRECONDITION,
    "not_selected": grpc.StatusCode.FAILED_PRECONDITION,
    "duplicate": grpc.StatusCode.ALREADY_EXISTS,
    "checksum": grpc.StatusCode.DATA_LOSS,
    "too_large": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "busy": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "unauthenticated": grpc.StatusCode.UNAUTHENTICATED,
    "server_error": grpc.StatusCode.UNAVAILABLE,
}


# Refusals that say nothing about the named client's own upload: an impostor without its
# token, a second concurrent stream, a repeat of an upload that already counted.
_NOT_THE_CLIENTS_FAILURE = {
    "unauthenticated",
    "busy",
    "duplicate",
    "unknown_client",
    "not_selected",
}


def _is_the_clients_own_failure(error: FedstreamError) -> bool:
    return not (isinstance(error, UploadRejected) and error.reason in _NOT_THE_CLIENTS_FAILURE)


def _chunk_frame(data: bytes) -> bytes:
    """A serialised ServerMessage carrying one chunk (made once per round, see broadcast)."""
    return bytes(pb.ServerMessage(chunk=pb.Chunk(data=data)).SerializeToString())


def _serialize_server_message(message: pb.ServerMessage | bytes) -> bytes:
    # Chunk frames arrive already serialised; everything else is a message.
    if isinstance(message, bytes):
        return message
    return bytes(message.SerializeToString())


def add_to_server(servicer: FederationServicer, server: grpc.aio.Server) -> None:
    """Register the Federation service; WatchRounds may yield pre-serialised frames."""
    handlers = {
        "Join": grpc.unary_unary_rpc_method_handler(
            servicer.Join,
            request_deserializer=pb.JoinRequest.FromString,
            response_serializer=pb.JoinReply.SerializeToString,
        ),
        "WatchRounds": grpc.unary_stream_rpc_method_handler(
            servicer.WatchRounds,
            request_deserializer=pb.WatchRequest.FromString,
            response_serializer=_serialize_server_message,
        ),
        "PushUpdate": grpc.stream_unary_rpc_method_handler(
            servicer.PushUpdate,
            request_deserializer=pb.UpdateMessage.FromString,
            response_serializer=pb.UpdateReply.SerializeToString,
        ),
        "SubmitEvaluation": grpc.unary_unary_rpc_method_handler(
            servicer.SubmitEvaluation,
            request_deserializer=pb.EvaluationResult.FromString,
            response_serializer=pb.ReportReply.SerializeToString,
        ),
        "ReportFailure": grpc.unary_unary_rpc_method_handler(
            servicer.ReportFailure,
            request_deserializer=pb.FailureReport.FromString,
            response_serializer=pb.ReportReply.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))


def status_for(error: FedstreamError) -> grpc.StatusCode:
    if isinstance(error, UploadRejected):
        return _STATUS_BY_REASON.get(error.reason, grpc.StatusCode.INVALID_ARGUMENT)
    if isinstance(error, ManifestError):
        return grpc.StatusCode.INVALID_ARGUMENT
    return grpc.StatusCode.INTERNAL


class FederationServicer(pb_grpc.FederationServicer):  # type: ignore[misc]
    def __init__(
        self,
        coordinator: Coordinator,
        max_message_bytes: int,
        tokens: TokenTable | None = None,
    ) -> None:
        self.coordinator = coordinator
        self.max_message_bytes = max_message_bytes
        self.tokens = tokens
        self._broadcast: tuple[str, Broadcast] | None = None

    def _check_token(self, context: grpc.aio.ServicerContext, client_id: str) -> bool:
        """Refuse a call without a valid token; True when it is ``client_id``'s own token."""
        if self.tokens is None:
            return False
        token = bearer_token(context.invocation_metadata())
        if not self.tokens.admits(client_id, token):
            raise UploadRejected(
                f"client {client_id!r} from {context.peer()} presented no valid token",
                reason="unauthenticated",
            )
        owns: bool = self.tokens.owns(client_id, token)
        return owns

    @staticmethod
    def _credential(context: grpc.aio.ServicerContext) -> str | None:
        value: str | None = metadata_value(context.invocation_metadata(), CREDENTIAL_METADATA_KEY)
        return value

    def _authenticate(self, context: grpc.aio.ServicerContext, client_id: str) -> None:
        """Every call after Join: a valid token (if tokens are on) and the id's credential."""
        self._check_token(context, client_id)
        try:
            self.coordinator.registry.verify(client_id, self._credential(context))
        except UploadRejected as error:
            if error.reason != "unauthenticated":
                raise
            raise UploadRejected(f"{error} from {context.peer()}", reason=error.reason) from None

    async def Join(  # noqa: N802 - gRPC method name
        self, request: pb.JoinRequest, context: grpc.aio.ServicerContext
    ) -> pb.JoinReply:
        if request.protocol_version != PROTOCOL_VERSION:
            older = "client" if request.protocol_version < PROTOCOL_VERSION else "server"
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"protocol version {request.protocol_version} is not supported (server "
                f"speaks {PROTOCOL_VERSION}): upgrade fedstream on the {older}",
            )
        client_id = request.client_id or f"client-{uuid.uuid4().hex[:8]}"
        if len(client_id) > 128:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "client id longer than 128")
        hint = request.partition_index if request.HasField("partition_index") else None
        try:
            owns_id = self._check_token(context, client_id)
            admission = self.coordinator.join(client_id, hint, self._credential(context), owns_id)
        except FedstreamError as error:
            log.warning("join refused: %s (peer %s)", error, context.peer())
            await context.abort(status_for(error), str(error))
        return pb.JoinReply(
            client_id=client_id,
            run=wire.run_spec_to_pb(self.coordinator.config.run),
            partition_index=admission.session.partition_index,
            max_message_bytes=self.max_message_bytes,
            credential=admission.secret or "",
        )

    async def WatchRounds(  # noqa: N802
        self, request: pb.WatchRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ServerMessage | bytes]:
        try:
            self._authenticate(context, request.client_id)
            attachment = await self.coordinator.attach(
                request.client_id, self._credential(context)
            )
        except FedstreamError as error:
            log.warning("watch refused for client %r: %s", request.client_id, error)
            await context.abort(status_for(error), str(error))
        why = "disconnected"
        try:
            while True:
                event = await attachment.inbox.get()
                if isinstance(event, Finish):
                    why = event.reason
                    yield wire.finish_to_pb(event.reason, event.kind)
                    if self.coordinator.finished:
                        self.coordinator.finish_delivered(attachment.client_id)
                    return
                # A fresh token names this download in the shared frame cache.
                async for message in self._send_round(event, reader=object()):
                    yield message
        finally:
            # After Finish too: a client that finished is no longer connected, so shutdown
            # need not wait for it.
            self.coordinator.detach(attachment, "disconnected from the round stream")
            level = logging.DEBUG if why == "run complete" else logging.INFO
            log.log(level, "client %s: round stream closed (%s)", attachment.client_id, why)

    def _broadcast_for(self, plan_id: str) -> Broadcast:
        # One cache per plan: an evaluation plan in the same round sends the new model.
        if self._broadcast is None or self._broadcast[0] != plan_id:
            broadcast = Broadcast(
                self.coordinator.global_state,
                self.coordinator.manifest,
                self.coordinator.config.chunk_size_bytes,
                frame=_chunk_frame,
                expected_readers=self.coordinator.selected_count(plan_id),
            )
            self._broadcast = (plan_id, broadcast)
        return self._broadcast[1]

    async def _send_round(
        self, plan: RoundPlan, reader: object
    ) -> AsyncIterator[pb.ServerMessage | bytes]:
        if not self.coordinator.is_open(plan.plan_id):
            return
        yield wire.round_start_to_pb(plan)
        frames = self._broadcast_for(plan.plan_id).frames(reader)
        try:
            for frame in frames:
                # A plan that closed mid-download (deadline) stops sending: the model
                # is about to change, and the client waits for the next RoundStart.
                if not self.coordinator.is_open(plan.plan_id):
                    return
                yield frame
        finally:
            frames.close()
        yield pb.ServerMessage(
            end=pb.TransferEnd(
                total_bytes=plan.manifest.total_bytes, crc32=self.coordinator.payload_crc
            )
        )

    async def SubmitEvaluation(  # noqa: N802
        self, request: pb.EvaluationResult, context: grpc.aio.ServicerContext
    ) -> pb.ReportReply:
        try:
            result = wire.evaluation_from_pb(request)
            self._authenticate(context, result.client_id)
            self.coordinator.submit_evaluation(result)
        except FedstreamError as error:
            log.warning("evaluation refused: %s", error)
            await context.abort(status_for(error), str(error))
        return pb.ReportReply(counted=True)

    async def ReportFailure(  # noqa: N802
        self, request: pb.FailureReport, context: grpc.aio.ServicerContext
    ) -> pb.ReportReply:
        try:
            report = wire.failure_from_pb(request)
            self._authenticate(context, report.client_id)
            if report.client_id not in self.coordinator.sessions:
                raise UploadRejected(
                    f"client {report.client_id!r} is not known; join first",
                    reason="unknown_client",
                )
            counted = self.coordinator.report_failure(report)
        except FedstreamError as error:
            log.warning("failure report refused: %s", error)
            await context.abort(status_for(error), str(error))
        return pb.ReportReply(counted=counted)

    async def _drain(self, request_iterator: AsyncIterator[pb.UpdateMessage]) -> None:
        """Discard what is left of a refused upload, within the model's size and 10 s."""
        budget = self.coordinator.manifest.total_bytes + DRAIN_SLACK_BYTES
        with contextlib.suppress(Exception):
            async with asyncio.timeout(DRAIN_TIMEOUT_S):
                async for message in request_iterator:
                    budget -= message.ByteSize()
                    if budget < 0:
                        return

    async def PushUpdate(  # noqa: N802
        self,
        request_iterator: AsyncIterator[pb.UpdateMessage],
        context: grpc.aio.ServicerContext,
    ) -> pb.UpdateReply:
        ticket: UploadTicket | None = None
        header: UpdateHeader | None = None
        receiver = None
        where = "upload"
        try:
            first = await anext(aiter(request_iterator), None)
            if first is None or first.WhichOneof("kind") != "header":
                raise UploadRejected("an upload must start with an UpdateHeader")
            header = wire.update_header_from_pb(first.header)
            where = f"client {header.client_id!r}, round {header.round}"
            self._authenticate(context, header.client_id)
            ticket = self.coordinator.begin_upload(header)
            receiver = self.coordinator.new_receiver()
            ended = False
            async for message in request_iterator:
                kind = message.WhichOneof("kind")
                if ended:
                    raise UploadRejected("message after the end of the transfer")
                if kind == "chunk":
                    receiver.add_chunk(message.chunk.data)
                elif kind == "end":
                    receiver.finish(message.end.total_bytes, message.end.crc32)
                    ended = True
                else:
                    raise UploadRejected(f"unexpected {kind or 'empty'} message inside an upload")
            if not ended:
                raise UploadRejected(
                    f"stream ended after {receiver.received_bytes} of "
                    f"{receiver.manifest.total_bytes} bytes without a TransferEnd",
                    reason="checksum",
                )
            # The round owns the staged upload from here: it closes it after the fold.
            staged, receiver = receiver, None
            await self.coordinator.commit_upload(ticket, staged)
            return pb.UpdateReply(round=ticket.round)
        except DecodeError as error:
            # A message gRPC could not parse: malformed input, not a lost connection.
            log.warning("rejected %s: undecodable message (%s)", where, error)
            if header is not None:
                self.coordinator.upload_failed(
                    header.client_id, header.round, "bad upload: undecodable message"
                )
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "upload carries a message that is not protobuf"
            )
            raise AssertionError("unreachable") from None
        except FedstreamError as error:
            log.warning("rejected %s: %s", where, error)
            if header is not None and _is_the_clients_own_failure(error):
                self.coordinator.upload_failed(
                    header.client_id, header.round, f"bad upload: {error}"
                )
            # Refused before the client finished sending: read (and drop) the rest first,
            # or gRPC's asyncio client reports "Internal error from Core" instead of this
            # status when its next write finds the call closed (grpc/grpc#36066).
            await self._drain(request_iterator)
            await context.abort(status_for(error), str(error))
            raise AssertionError("unreachable") from None  # abort always raises
        except BaseException:
            # Cancelled: the client went away mid-upload.
            if ticket is not None and self.coordinator.is_folding(ticket.client_id):
                log.warning(
                    "%s: connection lost after the upload arrived; the round finishes folding it",
                    where,
                )
            elif ticket is not None:
                self.coordinator.upload_failed(
                    ticket.client_id, ticket.round, "connection lost during upload"
                )
                log.warning("%s: connection lost during upload", where)
            raise
        finally:
            if ticket is not None:
                self.coordinator.end_upload(ticket)
            if receiver is not None:
                receiver.close()
