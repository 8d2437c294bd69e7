"""The streaming weighted mean: FedAvg, FedProx and the server-optimizer family.

FedAvg (McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from
Decentralized Data", arXiv:1602.05629): the round's aggregate is the example-weighted
average of the clients' deltas, sum_k n_k * delta_k / sum_k n_k. :class:`MeanReduction`
folds each upload into one running sum as soon as it is accepted and releases it, so the
server holds one sum whatever the number of clients (the fold is today's
:class:`~fedstream.server.aggregate.DeltaAccumulator`, bit for bit).

FedProx (Li et al. 2020, "Federated Optimization in Heterogeneous Networks", MLSys,
arXiv:1812.06127) aggregates exactly like FedAvg; what differs is the client's objective,
which gains the proximal term mu/2 * ||w - w_global||^2. The server's part is to send
``proximal_mu`` in every client's config map (see ``registry.py``).

FedAvgM, FedAdam, FedYogi and FedAdagrad use the same mean as their pseudo-gradient and
differ only in the server optimizer (``optimizers.py``).

Claimed example counts are the weights, so a client could claim a huge number to dominate
the average: the strategy's ``max_examples`` option caps each client's weight.
"""

from __future__ import annotations

from fedstream.common.codec import Manifest
from fedstream.server.aggregate import APPLY_BLOCK_ELEMENTS, DeltaAccumulator
from fedstream.server.strategies.base import ApplyBlock, Info, StagedUpload
from fedstream.server.upload import READ_BLOCK_BYTES


def fold_upload(accumulator: DeltaAccumulator, upload: StagedUpload, weight: int) -> None:
    """Fold all of ``upload`` into ``accumulator`` with ``weight``, one read block at a time."""
    for spec in accumulator.manifest.specs:
        per_block = max(1, READ_BLOCK_BYTES // spec.itemsize)
        for start in range(0, spec.numel, per_block):
            count = min(per_block, spec.numel - start)
            accumulator.fold(spec.name, start, upload.read(spec.name, start, count), weight)
    accumulator.commit(weight)


class MeanReduction:
    """Example-weighted mean, folded as uploads arrive; memory: one model (the sum)."""

    def __init__(self, manifest: Manifest) -> None:
        self._sum = DeltaAccumulator(manifest)

    def take(self, upload: StagedUpload, weight: int) -> bool:
        fold_upload(self._sum, upload, weight)
        upload.release()
        return False

    def reduce(self, apply: ApplyBlock) -> Info:
        for spec, start, average in self._sum.average_blocks(APPLY_BLOCK_ELEMENTS):
            apply(spec, start, average)
        return {"total_weight": self._sum.total_weight}

    def close(self) -> None:
        """Nothing is kept: every upload was released when it was folded."""
