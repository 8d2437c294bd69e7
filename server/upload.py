"""Receive one client's delta, check it completely, then fold it into the running sum.

Why stage before folding: a delta is folded into the shared sum only once every byte has
arrived, the CRC matches and every float is finite. A client that dies or lies half-way
therefore leaves no trace in the global model. Staging goes through a
``SpooledTemporaryFile``: small uploads stay in memory, larger ones roll over to a
temporary file, so the server's resident memory stays at about two models (the global
model and the sum) however many clients upload at once.
"""

from __future__ import annotations

import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import torch
from fedstream.common.codec import Manifest, all_finite
from fedstream.common.errors import UploadRejected
from fedstream.server.aggregate import DeltaAccumulator

READ_BLOCK_BYTES = 4 << 20


class UploadReceiver:
    """Byte-level checks while the stream arrives; tensor-level checks at the end."""

    def __init__(
        self, manifest: Manifest, spool_memory_bytes: int = 8 << 20, spool_dir: Path | None = None
    ) -> None:
        self.manifest = manifest
        folder = None if spool_dir is None else str(spool_dir)
        # SpooledTemporaryFile reads max_size=0 as "never roll over"; 0 here means "always
        # on disk", so it gets a plain temporary file.
        self._spool: IO[bytes] = (  # both are BinaryIO with readinto at run time
            tempfile.SpooledTemporaryFile(max_size=spool_memory_bytes, dir=folder)
            if spool_memory_bytes > 0
            else tempfile.TemporaryFile(dir=folder)
        )
        self._crc = 0
        self.received_bytes = 0
        self.complete = False

    def add_chunk(self, data: bytes) -> None:
        if self.complete:
            raise UploadRejected("chunk after the end of the transfer")
        if self.received_bytes + len(data) > self.manifest.total_bytes:
            raise UploadRejected(
                f"stream carries more than the {self.manifest.total_bytes} bytes its manifest "
                "declares"
            )
        self._crc = zlib.crc32(data, self._crc)
        self._spool.write(data)
        self.received_bytes += len(data)

    def finish(self, total_bytes: int, crc32: int) -> None:
        """Check the trailer against what arrived."""
        if total_bytes != self.manifest.total_bytes:
            raise UploadRejected(
                f"trailer declares {total_bytes} bytes, manifest {self.manifest.total_bytes}"
            )
        if self.received_bytes != total_bytes:
            raise UploadRejected(
                f"stream truncated: {self.received_bytes} of {total_bytes} bytes arrived",
                reason="checksum",
            )
        if self._crc != crc32:
            raise UploadRejected(
                f"checksum mismatch: got {self._crc:#010x}, trailer says {crc32:#010x}",
                reason="checksum",
            )
        self.complete = True

    def check_finite(self) -> None:
        """Refuse NaN or Inf anywhere in the delta (reads the staged payload once)."""
        for name, offset, values in self._iter():
            if not all_finite(values):
                raise UploadRejected(
                    f"tensor {name!r} holds NaN or Inf (from element {offset})",
                    reason="non_finite",
                )

    def fold_into(self, accumulator: DeltaAccumulator, weight: int) -> None:
        for name, offset, values in self._iter():
            accumulator.fold(name, offset, values, weight)
        accumulator.commit(weight)

    def _iter(self) -> Iterator[tuple[str, int, torch.Tensor]]:
        """Stream blocks lazily so only one block is in memory at a time.

        Every block is read into the same buffer, so a yielded tensor is valid only until
        the next one is requested (both callers use each block at once). A fresh buffer per
        block cost a zero-filled allocation and its page faults per 4 MiB (benchmark B3).
        """
        if not self.complete:
            raise UploadRejected("upload is not complete")
        block = bytearray(READ_BLOCK_BYTES)
        window = memoryview(block)
        for spec, offset in zip(self.manifest.specs, self.manifest.offsets, strict=True):
            self._spool.seek(offset)
            elements_per_block = max(1, READ_BLOCK_BYTES // spec.itemsize)
            done = 0
            while done < spec.numel:
                count = min(elements_per_block, spec.numel - done)
                size = count * spec.itemsize
                if self._spool.readinto(window[:size]) != size:  # type: ignore[attr-defined]
                    raise UploadRejected(f"staged upload of tensor {spec.name!r} is truncated")
                yield spec.name, done, torch.frombuffer(block, dtype=spec.torch_dtype,
                                                        count=count)
                done += count

    def close(self) -> None:
        self._spool.close()
