"""Staged uploads as strategies read them: adapters onto the :class:`StagedUpload` protocol.

- :class:`ReceiverUpload` wraps the server's :class:`~fedstream.server.upload.UploadReceiver`
  (memory or disk staging, checked in full) with the identity the round gave it.
- :class:`InMemoryUpload` holds a delta as tensors (tests, and deltas built in process).

Both read a block into one reusable buffer per dtype, so reading a whole upload block by
block allocates once, not once per block.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from fedstream.common.codec import Manifest
from fedstream.server.upload import UploadReceiver


class _Scratch:
    """One growable flat buffer per dtype; a read returns a view of its first elements."""

    def __init__(self) -> None:
        self._buffers: dict[torch.dtype, torch.Tensor] = {}

    def take(self, dtype: torch.dtype, count: int) -> torch.Tensor:
        buffer = self._buffers.get(dtype)
        if buffer is None or buffer.numel() < count:
            # A new tensor rather than a resize: a caller may still hold the old view.
            buffer = torch.empty(count, dtype=dtype)
            self._buffers[dtype] = buffer
        return buffer[:count]


class ReceiverUpload:
    """A complete, checked :class:`UploadReceiver` plus who sent it and what it reported."""

    def __init__(
        self,
        receiver: UploadReceiver,
        client_id: str,
        num_examples: int,
        metrics: Mapping[str, float] | None = None,
    ) -> None:
        if not receiver.complete:
            raise ValueError(f"client {client_id!r}: the upload is not complete")
        self._receiver = receiver
        self._client_id = client_id
        self._num_examples = num_examples
        self._metrics = dict(metrics or {})
        self._specs = {spec.name: spec for spec in receiver.manifest.specs}
        self._scratch = _Scratch()
        self.released = False

    @property
    def client_id(self) -> str:
        return self._client_id

    @property
    def num_examples(self) -> int:
        return self._num_examples

    @property
    def metrics(self) -> Mapping[str, float]:
        return self._metrics

    @property
    def manifest(self) -> Manifest:
        return self._receiver.manifest

    def read(self, name: str, start: int, count: int) -> torch.Tensor:
        if self.released:
            raise ValueError(f"client {self._client_id!r}: the upload was released")
        if name not in self._specs:
            raise KeyError(f"client {self._client_id!r}: upload has no tensor {name!r}")
        out = self._scratch.take(self._specs[name].torch_dtype, count)
        self._receiver.read_into(name, start, out)
        return out

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._receiver.close()


class InMemoryUpload:
    """A delta held as tensors, behind the same protocol."""

    def __init__(
        self,
        client_id: str,
        num_examples: int,
        delta: Mapping[str, torch.Tensor],
        metrics: Mapping[str, float] | None = None,
    ) -> None:
        self._client_id = client_id
        self._num_examples = num_examples
        self._flat = {name: t.detach().reshape(-1).contiguous() for name, t in delta.items()}
        self._manifest = Manifest.of(dict(delta))
        self._metrics = dict(metrics or {})
        self._scratch = _Scratch()
        self.released = False
        self.reads = 0

    @property
    def client_id(self) -> str:
        return self._client_id

    @property
    def num_examples(self) -> int:
        return self._num_examples

    @property
    def metrics(self) -> Mapping[str, float]:
        return self._metrics

    @property
    def manifest(self) -> Manifest:
        return self._manifest

    def read(self, name: str, start: int, count: int) -> torch.Tensor:
        if self.released:
            raise ValueError(f"client {self._client_id!r}: the upload was released")
        flat = self._flat[name]
        if start < 0 or start + count > flat.numel():
            raise ValueError(
                f"tensor {name!r}: elements [{start}, {start + count}) are outside its "
                f"{flat.numel()} elements"
            )
        self.reads += 1
        out = self._scratch.take(flat.dtype, count)
        out.copy_(flat[start : start + count])
        return out

    def release(self) -> None:
        self.released = True
