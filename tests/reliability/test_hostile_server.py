"""The client against a broken or hostile server (``tests/reliability/hostile_server.py``).

The client under test is the real one (``run_client``, in this process); the server is
a scripted peer speaking the real protocol. A client must check what a server declares
against its own model before it allocates anything, refuse bad transfers, back off
between attempts, and give up with its own exit status after a bounded number of
refused transfers in a row, never loop at full speed or hang.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import pytest
import torch
from fedstream.client.main import EXIT_PROTOCOL, run_client
from fedstream.client.settings import ClientSettings
from fedstream.common import wire
from fedstream.common.codec import Manifest, TensorSpec
from fedstream.common.pb import fedstream_pb2 as pb

from tests.reliability.hostile_server import (
    Calls,
    Script,
    finish,
    honest_transfer,
    idle,
    real_state,
    round_start,
    start_hostile_server,
)

pytestmark = pytest.mark.asyncio

STATE = real_state()
MANIFEST = Manifest.of(STATE)
MANIFEST_PB = wire.manifest_to_pb(MANIFEST)
CLIENT_TIMEOUT_S = 60.0


def settings_for(port: int, **overrides: object) -> ClientSettings:
    values: dict[str, object] = {
        "server": f"127.0.0.1:{port}",
        "client_id": "honest",
        "max_steps": 0,  # no training: these tests are about the transfer
        "num_threads": torch.get_num_threads(),
        "backoff_initial_s": 0.1,
        "backoff_max_s": 1.6,
        "connect_timeout_s": 10.0,
    }
    values.update(overrides)
    return ClientSettings(**values)  # type: ignore[arg-type]


async def run_against(script: Script, **overrides: object) -> tuple[int, Calls]:
    server, servicer, port = await start_hostile_server(script)
    try:
        code = await asyncio.wait_for(
            run_client(settings_for(port, **overrides)), CLIENT_TIMEOUT_S
        )
    finally:
        await server.stop(0)
    return code, servicer.calls


def manifest_with_first_tensor(shape: tuple[int, ...]) -> pb.Manifest:
    """The real manifest with its first tensor resized: a lie that is self-consistent."""
    first, *rest = MANIFEST.specs
    return wire.manifest_to_pb(Manifest((TensorSpec(first.name, first.dtype, shape), *rest)))


# ---- item 10: the manifest is checked against the client's own model ----------------


async def test_a_manifest_declaring_256_gib_is_refused_before_allocating(
    caplog: pytest.LogCaptureFixture,
) -> None:
    huge = manifest_with_first_tensor((64, 1 << 30))  # float32: 256 GiB

    async def script(_: int) -> AsyncIterator[pb.ServerMessage]:
        yield round_start(huge)
        await idle()

    caplog.set_level(logging.WARNING)
    code, calls = await run_against(script, max_protocol_errors=2)
    assert code == EXIT_PROTOCOL
    assert "does not match this client's model" in caplog.text
    assert "[64, 1073741824]" in caplog.text  # the message names what the server declared


async def test_a_manifest_declaring_too_much_is_refused_before_any_byte() -> None:
    inflated = manifest_with_first_tensor((1 << 28,))  # 1 GiB for a 0.6 MB model

    async def script(_: int) -> AsyncIterator[pb.ServerMessage]:
        yield round_start(inflated)
        for _ in range(1 << 10):
            yield pb.ServerMessage(chunk=pb.Chunk(data=bytes(1 << 20)))
        await idle()

    code, calls = await run_against(script, max_protocol_errors=1)
    assert code == EXIT_PROTOCOL
    # The client hung up at RoundStart: what was sent is what gRPC buffers, not 1 GiB.
    assert max(calls.sent_bytes) <= 32 << 20


# ---- item 12: refused transfers back off, and end after a bounded number -------------


def bad_dtype(_: int) -> AsyncIterator[pb.ServerMessage]:
    async def messages() -> AsyncIterator[pb.ServerMessage]:
        manifest = pb.Manifest()
        manifest.CopyFrom(MANIFEST_PB)
        manifest.tensors[0].dtype = "float128"
        yield round_start(manifest)
        await idle()

    return messages()


def checksum_mismatch(_: int) -> AsyncIterator[pb.ServerMessage]:
    async def messages() -> AsyncIterator[pb.ServerMessage]:
        for message in honest_transfer(STATE, crc_xor=1):
            yield message
        await idle()

    return messages()


def overlong_stream(_: int) -> AsyncIterator[pb.ServerMessage]:
    async def messages() -> AsyncIterator[pb.ServerMessage]:
        for message in honest_transfer(STATE):
            if message.WhichOneof("kind") == "end":
                yield pb.ServerMessage(chunk=pb.Chunk(data=b"\0" * 64))
            yield message
        await idle()

    return messages()


@pytest.mark.parametrize("script", [bad_dtype, checksum_mismatch, overlong_stream])
async def test_refused_transfers_back_off_then_give_up(
    script: Script, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    code, calls = await run_against(script, max_protocol_errors=4)
    assert code == EXIT_PROTOCOL
    watches = calls.watches
    assert len(watches) == 4
    # Full jitter draws each delay from [ceiling/2, ceiling], ceiling = 0.1 s * 2**k.
    gaps = [later - earlier for earlier, later in zip(watches, watches[1:], strict=False)]
    for k, gap in enumerate(gaps):
        assert gap >= 0.1 * 2**k / 2, gaps
    assert "4 refused transfers in a row" in caplog.text


async def test_an_endless_stream_of_empty_chunks_is_cut(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def script(_: int) -> AsyncIterator[pb.ServerMessage]:
        yield round_start(MANIFEST_PB)
        while True:
            yield pb.ServerMessage(chunk=pb.Chunk(data=b""))
            await asyncio.sleep(0.001)

    caplog.set_level(logging.WARNING)
    code, _ = await run_against(script, max_protocol_errors=1, download_stall_timeout_s=0.5)
    assert code == EXIT_PROTOCOL
    assert "no progress" in caplog.text


async def test_a_good_round_resets_the_count_of_refused_transfers() -> None:
    # bad, bad, good, bad, bad, Finish: never three bad ones in a row.
    async def script(index: int) -> AsyncIterator[pb.ServerMessage]:
        if index in (2, 5):
            for message in honest_transfer(STATE, round_number=index):
                yield message
            if index == 5:
                yield finish()
            return  # the stream closes, as a restarting server's does
        async for message in checksum_mismatch(index):
            yield message

    code, calls = await run_against(script, max_protocol_errors=3)
    assert code == 0
    assert calls.uploads == [2, 5]
