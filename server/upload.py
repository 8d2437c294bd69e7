"""Receive one client's delta, check it completely, then fold it into the running sum.

Why stage before folding: a delta is folded into the shared sum only once every byte has
arrived, the CRC matches and every value is finite and within ``max_abs`` (``--max-update-abs``).
A client that dies or lies half-way therefore leaves no trace in the global model. The
bound keeps an honest-looking but enormous delta (1e30, say) from overflowing the float32
sum: with at most ``--max-num-examples`` weight per client and a bound of 1e15, a thousand
clients sum to at most 1e27, far below float32's 3.4e38. Staging goes through a
``SpooledTemporaryFile``: small uploads stay in memory, larger ones roll over to a
temporary file, so the server's resident memory stays at about two models (the global
model and the sum) however many clients upload at once.
"""

from __future__ import annotations

import math
import tempfile
import warnings
import zlib
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import IO

import torch
from fedstream.common.codec import Manifest, TensorSpec
from fedstream.common.errors import AggregateError, UploadRejected
from fedstream.server.aggregate import DeltaAccumulator

READ_BLOCK_BYTES = 4 << 20
DEFAULT_MAX_ABS = 1e15  # --max-update-abs


class FiniteScanner:
    """Finds NaN, Inf or a value beyond +/-``max_abs`` in a payload as it streams past.

    One pass, no staging: ``aminmax`` of each piece answers both questions at once (NaN
    propagates into both ends, an infinity or a huge value shows at one end). Integer
    tensors are bounded too (a counter's delta of 2**62 is as much a lie as 1e30); bool
    tensors cannot be out of range. Chunks may end in the middle of an element, so up to
    ``itemsize - 1`` bytes are carried over to the next chunk; padding between tensors is
    skipped.
    """

    def __init__(self, manifest: Manifest, max_abs: float = DEFAULT_MAX_ABS) -> None:
        self._regions = [
            (offset, offset + spec.nbytes, spec)
            for spec, offset in zip(manifest.specs, manifest.offsets, strict=True)
            if spec.torch_dtype != torch.bool and spec.nbytes
        ]
        self.max_abs = max_abs
        self._index = 0
        self._carry = b""
        self.position = 0
        self.first_bad: str | None = None
        self.problem = ""  # what is wrong with ``first_bad``
        self.reason = "non_finite"

    def feed(self, data: bytes) -> None:
        view = memoryview(data)
        start, end = self.position, self.position + len(data)
        self.position = end
        while self.first_bad is None and self._index < len(self._regions):
            region_start, region_end, spec = self._regions[self._index]
            low, high = max(start, region_start), min(end, region_end)
            if low < high:
                self._scan(spec, view[low - start : high - start])
            if region_end > end:
                return
            self._index += 1
            self._carry = b""

    def _scan(self, spec: TensorSpec, piece: memoryview) -> None:
        if self._carry:
            need = spec.itemsize - len(self._carry)
            whole, piece = self._carry + bytes(piece[:need]), piece[need:]
            if len(whole) < spec.itemsize:
                self._carry = whole
                return
            self._carry = b""
            self._check(spec, whole)
        usable = len(piece) - len(piece) % spec.itemsize
        if usable:
            self._check(spec, piece[:usable])
        self._carry = bytes(piece[usable:])

    def _check(self, spec: TensorSpec, raw: bytes | memoryview) -> None:
        with warnings.catch_warnings():
            # The values are only read; torch warns about any read-only buffer.
            warnings.simplefilter("ignore", UserWarning)
            values = torch.frombuffer(raw, dtype=spec.torch_dtype)
        low, high = (float(end) for end in torch.aminmax(values))
        if not (math.isfinite(low) and math.isfinite(high)):
            self.first_bad, self.problem, self.reason = spec.name, "holds NaN or Inf", "non_finite"
        elif high > self.max_abs or low < -self.max_abs:
            extreme = high if high > -low else low
            self.first_bad, self.reason = spec.name, "out_of_range"
            self.problem = (
                f"holds {extreme:g}, beyond the bound of {self.max_abs:g} (--max-update-abs)"
            )


class UploadReceiver:
    """Byte-level and value checks while the stream arrives; the fold reads it back once."""

    def __init__(
        self,
        manifest: Manifest,
        spool_memory_bytes: int = 1 << 20,
        spool_dir: Path | None = None,
        max_abs: float = DEFAULT_MAX_ABS,
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
        self._scanner = FiniteScanner(manifest, max_abs)
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
        self._scanner.feed(data)
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
        """Refuse NaN, Inf or a value beyond the bound anywhere in the delta (found while
        the chunks arrived)."""
        if not self.complete:
            raise UploadRejected("upload is not complete")
        if self._scanner.first_bad is not None:
            raise UploadRejected(
                f"tensor {self._scanner.first_bad!r} {self._scanner.problem}",
                reason=self._scanner.reason,
            )

    def fold_into(self, accumulator: DeltaAccumulator, weight: int) -> None:
        """Fold the whole staged delta into ``accumulator``, or none of it.

        Should reading a block back fail part-way (an I/O error on the spool disk), the
        blocks already added are subtracted again and the upload is refused: the sum
        holds none of it, up to rounding (``s + w*x - w*x`` can differ from ``s`` in the
        last bit). Undoing by subtraction keeps memory at one block; folding into a
        scratch sum first would cost a whole model more. If the undo fails too, the sum
        cannot be trusted any more: :class:`AggregateError` says so, and the round fails.
        """
        if not self.complete:
            raise UploadRejected("upload is not complete")
        folded = 0
        try:
            for name, offset, values in self._iter():
                accumulator.fold(name, offset, values, weight)
                folded += 1
        except Exception as error:
            try:
                for index, (name, offset, values) in enumerate(self._iter()):
                    if index == folded:
                        break
                    accumulator.fold(name, offset, values, -weight)
            except Exception as undo_error:
                raise AggregateError(
                    f"a fold failed ({error}) and could not be undone ({undo_error}): the "
                    "round's sum holds part of an upload"
                ) from undo_error
            raise UploadRejected(
                f"the server could not read its staged copy of the upload back ({error}); "
                "it was not counted, send it again",
                reason="server_error",
            ) from error
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
                yield spec.name, done, torch.frombuffer(block, dtype=spec.torch_dtype, count=count)
                done += count

    @cached_property
    def _layout(self) -> dict[str, tuple[TensorSpec, int]]:
        return {
            spec.name: (spec, offset)
            for spec, offset in zip(self.manifest.specs, self.manifest.offsets, strict=True)
        }

    def read_into(self, name: str, start: int, out: torch.Tensor) -> None:
        """Fill ``out`` with elements [start, start + out.numel()) of staged tensor ``name``.

        Random access for strategies that reduce staged uploads block by block (a robust
        rule reads the same block of every client's upload). ``out`` is a contiguous 1-D
        tensor of the tensor's dtype; the bytes go straight into its memory.
        """
        if not self.complete:
            raise UploadRejected("upload is not complete")
        if name not in self._layout:
            raise KeyError(f"staged upload has no tensor {name!r}")
        spec, offset = self._layout[name]
        count = out.numel()
        if out.dtype != spec.torch_dtype or out.dim() != 1 or not out.is_contiguous():
            raise ValueError(
                f"tensor {name!r}: read needs a contiguous 1-D {spec.dtype} tensor, got "
                f"{out.dtype} of shape {tuple(out.shape)}"
            )
        if start < 0 or start + count > spec.numel:
            raise ValueError(
                f"tensor {name!r}: elements [{start}, {start + count}) are outside its "
                f"{spec.numel} elements"
            )
        if count == 0:
            return
        size = count * spec.itemsize
        self._spool.seek(offset + start * spec.itemsize)
        window = memoryview(out.view(torch.uint8).numpy())  # type: ignore[arg-type]
        if self._spool.readinto(window) != size:  # type: ignore[attr-defined]
            raise UploadRejected(f"staged upload of tensor {name!r} is truncated")

    def close(self) -> None:
        self._spool.close()
