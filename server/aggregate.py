"""Federated averaging of client deltas.

FedAvg (McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from
Decentralized Data", arXiv:1602.05629): the new global model is the old one plus the
average of the clients' deltas, each weighted by the client's number of training
examples. ``server_lr`` scales that step (1.0 is plain FedAvg; other values give the
server-side step size of FedOpt, Reddi et al. 2021, arXiv:2003.00295).

:func:`fedavg` is the pure definition. :class:`DeltaAccumulator` computes the same thing
incrementally, folding one client's delta at a time into a running weighted sum, so the
server holds one sum whatever the number of clients.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
from fedstream.common.codec import Manifest, TensorSpec, all_finite
from fedstream.common.errors import AggregateError


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a sum of ``dtype`` deltas is kept in.

    Half-precision and integer deltas (BatchNorm's ``num_batches_tracked``) are summed in
    a wider type so weighting them does not round or overflow; float32 stays float32, so
    the running sum costs one model of memory.
    """
    if dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    if dtype.is_floating_point:
        return dtype
    return torch.float64


def _cast_back(average: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if dtype.is_floating_point:
        return average.to(dtype)
    if dtype == torch.bool:
        return average >= 0.5
    return torch.round(average).to(dtype)


def fedavg(deltas: Sequence[tuple[Mapping[str, torch.Tensor], int]]) -> dict[str, torch.Tensor]:
    """The example-weighted average of client deltas: sum_k n_k * delta_k / sum_k n_k."""
    if not deltas:
        raise ValueError("fedavg needs at least one delta")
    total = sum(weight for _, weight in deltas)
    if total <= 0:
        raise ValueError("fedavg needs a positive total number of examples")
    names = list(deltas[0][0])
    result: dict[str, torch.Tensor] = {}
    for name in names:
        dtype = deltas[0][0][name].dtype
        wide = accumulation_dtype(dtype)
        acc = torch.zeros_like(deltas[0][0][name], dtype=wide)
        for delta, weight in deltas:
            acc.add_(delta[name].to(wide), alpha=weight)
        result[name] = _cast_back(acc / total, dtype)
    return result


def apply_delta(
    global_state: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor], server_lr: float
) -> dict[str, torch.Tensor]:
    """global + server_lr * delta, tensor by tensor, in each tensor's own dtype."""
    updated: dict[str, torch.Tensor] = {}
    for name, weights in global_state.items():
        step = delta[name]
        if weights.is_floating_point():
            updated[name] = weights + step.to(weights.dtype) * server_lr
        else:
            # Counters such as num_batches_tracked: scaling an integer step is meaningless.
            updated[name] = weights + step.to(weights.dtype)
    return updated


APPLY_BLOCK_ELEMENTS = 1 << 22  # 4 Mi elements: 16 MB of float32 step at a time


class DeltaAccumulator:
    """Running example-weighted sum of client deltas, one model of memory.

    ``fold`` adds a slice of one tensor of one client's delta; callers fold a client's
    whole delta only once it has been received and validated in full, so a broken upload
    never leaves half of itself in the sum.
    """

    def __init__(self, manifest: Manifest) -> None:
        self.manifest = manifest
        self._specs: dict[str, TensorSpec] = {spec.name: spec for spec in manifest.specs}
        self._sums: dict[str, torch.Tensor] = {
            spec.name: torch.zeros(spec.numel, dtype=accumulation_dtype(spec.torch_dtype))
            for spec in manifest.specs
        }
        self.total_weight = 0
        self.num_folded = 0
        self._buffers: dict[torch.dtype, torch.Tensor] = {}
        self._spent = False  # apply_to reuses the sums' memory

    def fold(self, name: str, element_offset: int, values: torch.Tensor, weight: int) -> None:
        """Add ``weight * values`` to elements [offset, offset + len) of tensor ``name``."""
        if element_offset < 0:
            raise ValueError(f"tensor {name!r}: negative offset {element_offset}")
        target = self._sums[name][element_offset : element_offset + values.numel()]
        if target.numel() != values.numel():
            raise ValueError(f"tensor {name!r}: slice out of range")
        # Multiply, then add: two roundings instead of one fused multiply-add. Float
        # addition commutes and a fused ``s + w * x`` does not, so with two clients the
        # sum is bit-identical whichever upload arrives first (a resumed run then
        # reproduces a clean one exactly).
        scaled = self._scratch(values.numel(), target.dtype)
        flat = values.reshape(-1)
        if flat.dtype == scaled.dtype:
            torch.mul(flat, weight, out=scaled)  # one pass
        else:
            scaled.copy_(flat)  # widen first: half * weight would round in half
            scaled.mul_(weight)
        target.add_(scaled)

    def _scratch(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A reusable buffer of at least ``numel`` elements (no allocation per block)."""
        buffer = self._buffers.get(dtype)
        if buffer is None or buffer.numel() < numel:
            buffer = torch.empty(numel, dtype=dtype)
            self._buffers[dtype] = buffer
        return buffer[:numel]

    def fold_state(self, delta: Mapping[str, torch.Tensor], weight: int) -> None:
        """Fold a whole in-memory delta (tests and small models)."""
        for name in self._specs:
            self.fold(name, 0, delta[name], weight)
        self.commit(weight)

    def commit(self, weight: int) -> None:
        """Record that one client's delta of ``weight`` examples has been folded in full."""
        self.total_weight += weight
        self.num_folded += 1

    def average(self) -> dict[str, torch.Tensor]:
        """The weighted average delta, in each tensor's original dtype and shape."""
        self._check_usable()
        return {
            name: _cast_back(total / self.total_weight, spec.torch_dtype).view(spec.shape)
            for name, spec in self._specs.items()
            for total in (self._sums[name],)
        }

    def apply_to(self, global_state: Mapping[str, torch.Tensor], server_lr: float) -> None:
        """Add ``server_lr`` x the average delta to ``global_state`` in place.

        Works on slices of at most ``APPLY_BLOCK_ELEMENTS`` elements, so the temporary
        step is bounded whatever the size of one tensor: a whole-tensor step made a model
        held in one 2.5 GiB tensor cost a third model of memory (benchmark B5). The
        targets must be contiguous (the coordinator keeps them so).

        Every floating-point block is checked as it is written. Should one not be finite
        (an overflow, a huge ``server_lr``), the blocks already written are restored and
        :class:`AggregateError` names the tensor: ``global_state`` is then exactly as it
        was. The old weights are kept in the sum's own memory as the sum is used up (its
        dtype is at least as wide, so the copy is exact): no extra model of memory, and
        the step is computed exactly as before. The accumulator is spent afterwards.
        """
        self._check_usable()
        self._spent = True
        written: list[tuple[torch.Tensor, torch.Tensor]] = []  # (window, its old values)
        # Integer tensors cannot become non-finite: they go last, once nothing can fail.
        ordered = sorted(self._specs.values(), key=lambda s: not s.torch_dtype.is_floating_point)
        for spec in ordered:
            total = self._sums[spec.name]
            target = global_state[spec.name].view(-1)
            for start in range(0, total.numel(), APPLY_BLOCK_ELEMENTS):
                part = total[start : start + APPLY_BLOCK_ELEMENTS]
                step = _cast_back(part / self.total_weight, spec.torch_dtype)
                window = target[start : start + part.numel()]
                if not window.is_floating_point():
                    window.add_(step)
                    continue
                part.copy_(window)
                written.append((window, part))
                window.add_(step, alpha=server_lr)
                if not all_finite(window):
                    for changed, old in reversed(written):
                        changed.copy_(old)
                    problem = "the average delta" if not all_finite(step) else "the updated weights"
                    raise AggregateError(
                        f"tensor {spec.name!r}: {problem} would not be finite (server_lr "
                        f"{server_lr:g}); the global model keeps its previous weights"
                    )

    def _check_usable(self) -> None:
        if self.total_weight <= 0:
            raise ValueError("no delta has been folded")
        if self._spent:
            raise ValueError("the sum was used up by apply_to")

    def average_blocks(self, block_elements: int) -> Iterator[tuple[TensorSpec, int, torch.Tensor]]:
        """(spec, first element, average) of every tensor, ``block_elements`` at a time.

        The average is the sum divided by the total weight in the sum's own (wide) dtype,
        the same division ``apply_to`` does before casting back: a strategy's server
        optimizer applies these blocks to the model.
        """
        self._check_usable()
        for spec in self.manifest.specs:
            total = self._sums[spec.name]
            for start in range(0, total.numel(), block_elements):
                yield spec, start, total[start : start + block_elements] / self.total_weight
