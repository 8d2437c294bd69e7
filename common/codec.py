"""Tensors as raw bytes: the only way weights cross the network in fedstream.

A transfer is a :class:`Manifest` (name, allowlisted dtype name and shape of every
tensor), then the tensors' little-endian bytes laid end to end, each tensor starting at
a multiple of :data:`ALIGNMENT` bytes so a receiver can view its buffer as typed tensors
without copying, then a trailer holding the byte count and a CRC-32 of the payload.
Nothing here unpickles or evaluates peer bytes: a dtype is looked up in an allowlist and
a shape is a tuple of non-negative integers checked against a size limit.
"""

from __future__ import annotations

import bisect
import sys
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import cached_property

import torch
from fedstream.common.errors import ManifestError, TransferError

if sys.byteorder != "little":  # pragma: no cover - every platform torch ships for
    raise ImportError("fedstream's wire format is little-endian; this host is not")

ALIGNMENT = 8
DEFAULT_CHUNK_BYTES = 1 << 20  # 1 MiB: far below gRPC's 4 MiB message limit
# No single tensor may claim more than this: a peer's manifest is checked before anything
# is allocated for it (1 TiB, far beyond any model one process can hold).
MAX_TENSOR_BYTES = 1 << 40

DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}


def _aligned(offset: int) -> int:
    return -(-offset // ALIGNMENT) * ALIGNMENT


@dataclass(frozen=True)
class TensorSpec:
    """Name, dtype name and shape of one tensor in a transfer."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.name:
            raise ManifestError("tensor with an empty name")
        if self.dtype not in DTYPES:
            raise ManifestError(f"tensor {self.name!r}: dtype {self.dtype!r} is not allowed")
        if any(dim < 0 for dim in self.shape):
            raise ManifestError(f"tensor {self.name!r}: negative dimension in {self.shape}")
        if self.nbytes > MAX_TENSOR_BYTES:
            raise ManifestError(
                f"tensor {self.name!r}: shape {self.shape} needs {self.nbytes} bytes, more "
                f"than the {MAX_TENSOR_BYTES} a tensor may have"
            )

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def numel(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count

    @property
    def itemsize(self) -> int:
        return torch.empty((), dtype=self.torch_dtype).element_size()

    @property
    def nbytes(self) -> int:
        return self.numel * self.itemsize

    @classmethod
    def of(cls, name: str, tensor: torch.Tensor) -> TensorSpec:
        if tensor.dtype not in DTYPE_NAMES:
            raise ManifestError(f"tensor {name!r}: dtype {tensor.dtype} cannot be sent")
        return cls(name, DTYPE_NAMES[tensor.dtype], tuple(tensor.shape))


@dataclass(frozen=True)
class Manifest:
    """The ordered tensors of one transfer and where each starts in the payload."""

    specs: tuple[TensorSpec, ...]

    def __post_init__(self) -> None:
        names = [spec.name for spec in self.specs]
        if len(set(names)) != len(names):
            raise ManifestError("manifest names a tensor twice")

    @classmethod
    def of(cls, state: Mapping[str, torch.Tensor]) -> Manifest:
        return cls(tuple(TensorSpec.of(name, tensor) for name, tensor in state.items()))

    @cached_property
    def offsets(self) -> tuple[int, ...]:
        """Byte offset of each tensor in the payload (multiples of ALIGNMENT)."""
        offsets, cursor = [], 0
        for spec in self.specs:
            cursor = _aligned(cursor)
            offsets.append(cursor)
            cursor += spec.nbytes
        return tuple(offsets)

    @cached_property
    def total_bytes(self) -> int:
        if not self.specs:
            return 0
        return self.offsets[-1] + self.specs[-1].nbytes

    def describe_difference(self, other: Manifest) -> str | None:
        """Why ``other`` does not match this manifest, or None when it does."""
        mine = {spec.name: spec for spec in self.specs}
        theirs = {spec.name: spec for spec in other.specs}
        missing = sorted(mine.keys() - theirs.keys())
        unexpected = sorted(theirs.keys() - mine.keys())
        if missing or unexpected:
            return f"missing tensors {missing[:5]}, unexpected tensors {unexpected[:5]}"
        for spec in self.specs:
            got = theirs[spec.name]
            if got != spec:
                return (
                    f"tensor {spec.name!r}: expected {spec.dtype}{list(spec.shape)}, "
                    f"got {got.dtype}{list(got.shape)}"
                )
        if [s.name for s in self.specs] != [s.name for s in other.specs]:
            return "tensors are in a different order"
        return None


def as_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw bytes of a contiguous CPU tensor, without copying."""
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        tensor = tensor.detach().to("cpu").contiguous()
    if tensor.numel() == 0:
        return memoryview(b"")
    # view as uint8 keeps bfloat16 (which numpy lacks) and bool on the zero-copy path.
    array = tensor.detach().reshape(-1).view(torch.uint8).numpy()
    return memoryview(array.data).cast("B")


def iter_payload(
    state: Mapping[str, torch.Tensor], manifest: Manifest, chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> Iterator[bytes]:
    """Yield the payload of ``state`` laid out by ``manifest`` in chunks of ``chunk_bytes``.

    Every chunk but the last is exactly ``chunk_bytes`` long. Chunks are built lazily, so at
    most one chunk is held beyond the tensors themselves.
    """
    if chunk_bytes < 1:
        raise ValueError("chunk_bytes must be at least 1")
    pending: list[memoryview] = []
    pending_len = 0
    cursor = 0
    for spec, offset in zip(manifest.specs, manifest.offsets, strict=True):
        pieces: list[memoryview] = []
        if offset > cursor:
            pieces.append(memoryview(bytes(offset - cursor)))
        pieces.append(as_bytes(state[spec.name]))
        cursor = offset + spec.nbytes
        for piece in pieces:
            while len(piece):
                take = min(len(piece), chunk_bytes - pending_len)
                pending.append(piece[:take])
                pending_len += take
                piece = piece[take:]
                if pending_len == chunk_bytes:
                    yield b"".join(pending)
                    pending, pending_len = [], 0
    if pending_len:
        yield b"".join(pending)


def read_payload(
    state: Mapping[str, torch.Tensor], manifest: Manifest, start: int, length: int
) -> bytes:
    """Bytes [start, start + length) of the payload, without building the rest of it."""
    end = min(start + length, manifest.total_bytes)
    pieces: list[memoryview] = []
    cursor = start
    first = max(0, bisect.bisect_right(manifest.offsets, start) - 1)
    for spec, offset in zip(manifest.specs[first:], manifest.offsets[first:], strict=True):
        if cursor >= end:
            break
        if offset > cursor:  # zero padding before this tensor
            gap = min(offset, end) - cursor
            pieces.append(memoryview(bytes(gap)))
            cursor += gap
            if cursor >= end:
                break
        tensor_end = offset + spec.nbytes
        if tensor_end > cursor:
            raw = as_bytes(state[spec.name])
            take = min(tensor_end, end)
            pieces.append(raw[cursor - offset : take - offset])
            cursor = take
    return b"".join(pieces)


def crc32_of(state: Mapping[str, torch.Tensor], manifest: Manifest) -> int:
    crc = 0
    for chunk in iter_payload(state, manifest, chunk_bytes=16 << 20):
        crc = zlib.crc32(chunk, crc)
    return crc


def views(buffer: torch.Tensor, manifest: Manifest) -> dict[str, torch.Tensor]:
    """Typed tensors viewing a flat uint8 ``buffer`` laid out by ``manifest`` (no copy)."""
    if buffer.dtype != torch.uint8 or buffer.numel() < manifest.total_bytes:
        raise ManifestError("buffer is not a uint8 tensor large enough for the manifest")
    state: dict[str, torch.Tensor] = {}
    for spec, offset in zip(manifest.specs, manifest.offsets, strict=True):
        if spec.nbytes == 0:
            state[spec.name] = torch.empty(spec.shape, dtype=spec.torch_dtype)
            continue
        raw = buffer[offset : offset + spec.nbytes]
        state[spec.name] = raw.view(spec.torch_dtype).view(spec.shape)
    return state


def decode(payload: bytes | bytearray | memoryview, manifest: Manifest) -> dict[str, torch.Tensor]:
    """Copy a complete payload into fresh tensors (small transfers, tests)."""
    if len(payload) != manifest.total_bytes:
        raise ManifestError(
            f"payload has {len(payload)} bytes, manifest declares {manifest.total_bytes}"
        )
    buffer = torch.empty(manifest.total_bytes, dtype=torch.uint8)
    if manifest.total_bytes:
        buffer.numpy()[:] = memoryview(payload).cast("B")
    return views(buffer, manifest)


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether a tensor holds no NaN and no +/-Inf (always true for integer tensors).

    The minimum and the maximum are both finite exactly when every element is: NaN
    propagates into both, +Inf into the maximum, -Inf into the minimum. ``aminmax`` reads
    the tensor once and allocates nothing, where ``isfinite(t).all()`` writes full-size
    temporaries first; on a 400 MB model that made the check most of a download's time
    (benchmarks B1 and B3, see benchmarks/README.md).
    """
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))


def non_finite_tensor(state: Mapping[str, torch.Tensor]) -> str | None:
    """Name of the first floating-point tensor holding NaN or Inf, if any."""
    for name, tensor in state.items():
        if not all_finite(tensor):
            return name
    return None


class PayloadAssembler:
    """Writes a streamed payload straight into one preallocated flat buffer.

    The finished tensors are views of that buffer, so a received model costs its own
    size in memory and nothing more. ``pin_memory`` allocates the buffer in page-locked
    memory so the copy to a GPU can run asynchronously.
    """

    def __init__(
        self, manifest: Manifest, pin_memory: bool = False, reuse: torch.Tensor | None = None
    ) -> None:
        self.manifest = manifest
        if reuse is not None and reuse.numel() == manifest.total_bytes:
            # The previous round's buffer: its pages are already mapped, so filling it
            # runs at copy speed instead of page-fault speed. The caller must be done
            # with the tensors that viewed it.
            self._buffer = reuse
        else:
            self._buffer = torch.empty(
                manifest.total_bytes, dtype=torch.uint8, pin_memory=pin_memory
            )
        self._array = self._buffer.numpy()
        self._crc = 0
        self.received_bytes = 0

    def add(self, data: bytes) -> None:
        end = self.received_bytes + len(data)
        if end > self.manifest.total_bytes:
            raise TransferError(
                f"stream carries more than the {self.manifest.total_bytes} declared bytes"
            )
        self._array[self.received_bytes : end] = memoryview(data).cast("B")
        self._crc = zlib.crc32(data, self._crc)
        self.received_bytes = end

    @property
    def buffer(self) -> torch.Tensor:
        return self._buffer

    def finish(self, total_bytes: int, crc32: int) -> dict[str, torch.Tensor]:
        if total_bytes != self.manifest.total_bytes or self.received_bytes != total_bytes:
            raise TransferError(
                f"transfer incomplete: {self.received_bytes} bytes arrived, trailer says "
                f"{total_bytes}, manifest {self.manifest.total_bytes}"
            )
        if self._crc != crc32:
            raise TransferError(f"checksum mismatch: {self._crc:#010x} != {crc32:#010x}")
        state = views(self._buffer, self.manifest)
        bad = non_finite_tensor(state)
        if bad is not None:
            raise TransferError(f"tensor {bad!r} holds NaN or Inf")
        return state
