"""The round's model is encoded once and shared by every download, in bounded memory."""

from __future__ import annotations

import torch
from fedstream.common.codec import Manifest, iter_payload
from fedstream.server.broadcast import Broadcast

STATE = {
    "a": torch.arange(5, dtype=torch.int8),  # padding follows
    "w": torch.randn(100),
    "n": torch.tensor(3, dtype=torch.int64),
}
MANIFEST = Manifest.of(STATE)
CHUNK = 64


def framed(data: bytes) -> bytes:
    return b"<" + data + b">"


def expected_frames() -> list[bytes]:
    return [framed(chunk) for chunk in iter_payload(STATE, MANIFEST, CHUNK)]


def test_readers_in_step_share_one_encoding_of_each_chunk() -> None:
    broadcast = Broadcast(STATE, MANIFEST, CHUNK, framed, expected_readers=4)
    readers = [broadcast.frames(object()) for _ in range(4)]
    received: list[list[bytes]] = [[] for _ in readers]
    for _ in range(broadcast.num_chunks):
        for got, reader in zip(received, readers, strict=True):
            got.append(next(reader))
    assert all(got == expected_frames() for got in received)
    assert broadcast.encoded_chunks == broadcast.num_chunks  # not 4 x num_chunks
    for reader in readers:
        reader.close()
    assert broadcast.cached_bytes == 0


def test_cache_never_exceeds_its_cap_and_a_lagging_reader_encodes_its_own() -> None:
    frame_size = len(expected_frames()[0])
    broadcast = Broadcast(
        STATE, MANIFEST, CHUNK, framed, expected_readers=2, max_cached_bytes=2 * frame_size
    )
    fast, slow = broadcast.frames(object()), broadcast.frames(object())
    first_slow = next(slow)
    fast_frames = list(fast)
    assert broadcast.cached_bytes <= 2 * frame_size
    slow_frames = [first_slow, *slow]
    assert fast_frames == slow_frames == expected_frames()
    assert broadcast.num_chunks < broadcast.encoded_chunks < 2 * broadcast.num_chunks + 1
    assert broadcast.cached_bytes == 0


def test_a_reader_that_stops_early_releases_what_it_pinned() -> None:
    broadcast = Broadcast(STATE, MANIFEST, CHUNK, framed, expected_readers=2)
    quitter, reader = broadcast.frames(object()), broadcast.frames(object())
    next(quitter)
    next(reader)
    next(reader)
    assert broadcast.cached_bytes > 0  # the quitter still needs chunk 1
    quitter.close()
    assert broadcast.cached_bytes == 0


def test_frames_wait_for_readers_that_have_not_started_yet() -> None:
    broadcast = Broadcast(STATE, MANIFEST, CHUNK, framed, expected_readers=2)
    early = list(broadcast.frames(object()))
    assert broadcast.cached_bytes == sum(len(f) for f in early)  # kept for the second
    late = list(broadcast.frames(object()))
    assert late == early and broadcast.encoded_chunks == broadcast.num_chunks
    assert broadcast.cached_bytes == 0
