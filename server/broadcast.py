"""One round's global model as wire frames, encoded once and shared by every download.

Encoding a chunk (gathering its bytes from the tensors, then framing it as a protobuf
message) happens once per round, not once per client: the first reader to reach chunk
``i`` encodes it, the others send the same bytes. A frame is dropped as soon as every
expected reader has started and every reader still downloading has passed it, so the
cache holds only the spread between the fastest and the slowest reader. That spread is
capped at ``max_cached_bytes``: a reader further behind (a throttled link, a late
joiner) encodes its own frames, which costs CPU but never memory, so the server stays at
about two models whatever the number of clients.

All methods run on the event loop; there is no concurrent access.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import torch
from fedstream.common.codec import Manifest, read_payload

DEFAULT_MAX_CACHED_BYTES = 64 << 20


class Broadcast:
    def __init__(
        self,
        state: Mapping[str, torch.Tensor],
        manifest: Manifest,
        chunk_bytes: int,
        frame: Callable[[bytes], bytes],
        expected_readers: int,
        max_cached_bytes: int = DEFAULT_MAX_CACHED_BYTES,
    ) -> None:
        self._state = state
        self._manifest = manifest
        self._chunk_bytes = chunk_bytes
        self._frame = frame
        self._max_cached_bytes = max_cached_bytes
        self.num_chunks = -(-manifest.total_bytes // chunk_bytes)
        self._cache: dict[int, bytes] = {}
        self._cached_bytes = 0
        self._positions: dict[object, int] = {}
        self._expected = expected_readers
        self._started = 0
        self.encoded_chunks = 0  # how many chunk encodings were done (tests, benchmarks)

    def frames(self, reader: object) -> Iterator[bytes]:
        """Every chunk frame in order, for one reader (close the iterator when done)."""
        self._positions[reader] = 0
        self._started += 1
        try:
            for index in range(self.num_chunks):
                frame = self._cache.get(index)
                if frame is None:
                    frame = self._encode(index)
                self._positions[reader] = index + 1
                self._evict()
                yield frame
        finally:
            self._positions.pop(reader, None)
            self._evict()

    def _encode(self, index: int) -> bytes:
        start = index * self._chunk_bytes
        frame = self._frame(read_payload(self._state, self._manifest, start, self._chunk_bytes))
        self.encoded_chunks += 1
        # Cache only what another reader may still need, within the cap.
        behind = self._started < self._expected or any(
            position <= index for position in self._positions.values()
        )
        if behind and self._cached_bytes + len(frame) <= self._max_cached_bytes:
            self._cache[index] = frame
            self._cached_bytes += len(frame)
        return frame

    def _evict(self) -> None:
        if not self._cache or self._started < self._expected:
            return
        slowest = min(self._positions.values(), default=self.num_chunks)
        for index in [i for i in self._cache if i < slowest]:
            self._cached_bytes -= len(self._cache.pop(index))

    @property
    def cached_bytes(self) -> int:
        return self._cached_bytes
