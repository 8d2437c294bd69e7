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

from collections import Counter
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
        # How many readers stand at each position, and the lowest such position: kept
        # incrementally so each step costs O(1), not a scan over every reader.
        self._at: Counter[int] = Counter()
        self._slowest = self.num_chunks
        self._evicted_below = 0
        self._expected = expected_readers
        self._started = 0
        self.encoded_chunks = 0  # how many chunk encodings were done (tests, benchmarks)

    def frames(self, reader: object) -> Iterator[bytes]:
        """Every chunk frame in order, for one reader (close the iterator when done)."""
        position = 0
        self._arrive(position)
        self._started += 1
        try:
            for index in range(self.num_chunks):
                frame = self._cache.get(index)
                if frame is None:
                    frame = self._encode(index)
                self._leave(position)
                position = index + 1
                self._arrive(position)
                self._evict()
                yield frame
        finally:
            self._leave(position)
            self._evict()

    def _arrive(self, position: int) -> None:
        self._at[position] += 1
        self._slowest = min(self._slowest, position)

    def _leave(self, position: int) -> None:
        self._at[position] -= 1
        if not self._at[position]:
            del self._at[position]
            while self._slowest < self.num_chunks and self._slowest not in self._at:
                self._slowest += 1

    def _encode(self, index: int) -> bytes:
        start = index * self._chunk_bytes
        frame = self._frame(read_payload(self._state, self._manifest, start, self._chunk_bytes))
        self.encoded_chunks += 1
        # Cache only what another reader may still need (one not started, one behind, or
        # one at this same chunk besides the encoder), within the cap.
        others_need_it = (
            self._started < self._expected
            or self._slowest < index
            or self._at.get(index, 0) > 1
        )
        if others_need_it and self._cached_bytes + len(frame) <= self._max_cached_bytes:
            self._cache[index] = frame
            self._cached_bytes += len(frame)
        return frame

    def _evict(self) -> None:
        if self._started < self._expected:
            return
        for index in range(self._evicted_below, self._slowest):
            frame = self._cache.pop(index, None)
            if frame is not None:
                self._cached_bytes -= len(frame)
        self._evicted_below = max(self._evicted_below, self._slowest)

    @property
    def cached_bytes(self) -> int:
        return self._cached_bytes
