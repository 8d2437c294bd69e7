"""FedAvg and FedProx as strategies, the round's bookkeeping, and the staged-upload adapter.

The FedAvg strategy must give today's result bit for bit: the same staged uploads folded
by ``UploadReceiver.fold_into`` and applied by ``DeltaAccumulator.apply_to``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fedstream.common.codec import Manifest, crc32_of, iter_payload
from fedstream.server.aggregate import DeltaAccumulator
from fedstream.server.strategies import (
    InMemoryUpload,
    ReceiverUpload,
    StrategyError,
    build_strategy,
)
from fedstream.server.upload import UploadReceiver

from tests.unit.strategy_cases import (
    assert_equal_states,
    clone,
    mixed_deltas,
    run_round,
    uploads,
    zeros_like,
)


def staged(
    delta: dict[str, torch.Tensor], spool_memory_bytes: int = 1 << 20, spool_dir: Path | None = None
) -> UploadReceiver:
    manifest = Manifest.of(delta)
    receiver = UploadReceiver(manifest, spool_memory_bytes, spool_dir)
    for chunk in iter_payload(delta, manifest, 61):
        receiver.add_chunk(chunk)
    receiver.finish(manifest.total_bytes, crc32_of(delta, manifest))
    receiver.check_finite()
    return receiver


# ---- bit-identical to today's fold ------------------------------------------------------


@pytest.mark.parametrize("server_lr", [1.0, 0.7])
@pytest.mark.parametrize("spool_memory_bytes", [1 << 20, 0])
def test_fedavg_strategy_is_bit_identical_to_the_delta_accumulator(
    server_lr: float, spool_memory_bytes: int, tmp_path: Path
) -> None:
    deltas = mixed_deltas(4, seed=1)
    weights = [3, 17, 5, 11]
    gen = torch.Generator().manual_seed(9)
    start = {n: (torch.randn(t.shape, generator=gen) * 3).to(t.dtype) for n, t in deltas[0].items()}

    today = clone(start)
    accumulator = DeltaAccumulator(Manifest.of(deltas[0]))
    for delta, weight in zip(deltas, weights, strict=True):
        staged(delta, spool_memory_bytes, tmp_path).fold_into(accumulator, weight)
    accumulator.apply_to(today, server_lr)

    strategy = build_strategy("fedavg", {"server_lr": str(server_lr)})
    mine = clone(start)
    aggregator = strategy.begin_round(1, Manifest.of(mine))
    for i, (delta, weight) in enumerate(zip(deltas, weights, strict=True)):
        aggregator.accept(
            ReceiverUpload(staged(delta, spool_memory_bytes, tmp_path), f"c{i}", weight)
        )
    aggregator.finish(mine)
    assert_equal_states(mine, today)


def test_fedavg_on_the_hand_computed_example() -> None:
    # Weights 1 and 3: w = (1*[1, 2] + 3*[5, -2]) / 4 = [4, -1]; n = (10 + 63) / 4 -> 18.
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(10)}
    b = {"w": torch.tensor([5.0, -2.0]), "n": torch.tensor(21)}
    model = {"w": torch.tensor([1.0, 1.0]), "n": torch.tensor(100)}
    strategy = build_strategy("fedavg", {"server_lr": "0.5"})
    outcome = run_round(strategy, model, uploads([a, b], [1, 3]))
    # 1 + 0.5 * [4, -1] = [3, 0.5]; counters add unscaled: 100 + 18.
    torch.testing.assert_close(model["w"], torch.tensor([3.0, 0.5]))
    assert model["n"].item() == 118
    assert outcome.info["total_weight"] == 4


def test_fedavg_releases_each_upload_as_soon_as_it_is_folded() -> None:
    deltas = mixed_deltas(2, seed=2)
    staged_uploads = uploads(deltas)
    aggregator = build_strategy("fedavg").begin_round(1, Manifest.of(deltas[0]))
    aggregator.accept(staged_uploads[0])
    assert staged_uploads[0].released and not staged_uploads[1].released


def test_max_examples_caps_a_claimed_weight() -> None:
    # The liar claims 1e9 examples; capped at 10 its weight equals the honest client's.
    honest, liar = {"w": torch.tensor([1.0])}, {"w": torch.tensor([-99.0])}
    model = {"w": torch.tensor([0.0])}
    strategy = build_strategy("fedavg", {"max_examples": "10"})
    outcome = run_round(strategy, model, uploads([honest, liar], [10, 10**9]))
    assert model["w"].item() == pytest.approx((1.0 - 99.0) / 2)
    assert outcome.info["total_weight"] == 20


def test_without_a_cap_the_claimed_weight_dominates() -> None:
    honest, liar = {"w": torch.tensor([1.0])}, {"w": torch.tensor([-99.0])}
    model = {"w": torch.tensor([0.0])}
    run_round(build_strategy("fedavg"), model, uploads([honest, liar], [10, 10**9]))
    assert model["w"].item() == pytest.approx(-99.0, abs=1e-4)


def test_client_metrics_are_the_capped_weight_mean() -> None:
    model = {"w": torch.zeros(1)}
    staged_uploads = [
        InMemoryUpload("a", 1, {"w": torch.ones(1)}, {"loss": 2.0, "acc": 0.5}),
        InMemoryUpload("b", 3, {"w": torch.ones(1)}, {"loss": 6.0}),
        InMemoryUpload("c", 1000, {"w": torch.ones(1)}, {"loss": 0.0}),
    ]
    outcome = run_round(build_strategy("fedavg", {"max_examples": "4"}), model, staged_uploads)
    # loss: (1*2 + 3*6 + 4*0) / 8 = 2.5; acc only from a: 0.5
    assert outcome.metrics == {"acc": 0.5, "loss": 2.5}


# ---- FedProx ----------------------------------------------------------------------------


def test_fedprox_sends_proximal_mu_to_every_client_and_keeps_the_base_config() -> None:
    strategy = build_strategy("fedprox", {"mu": "0.1"})
    configs = strategy.configure(3, ["a", "b"], {"learning_rate": 0.05, "local_epochs": 2})
    assert configs == {
        "a": {"learning_rate": 0.05, "local_epochs": 2, "proximal_mu": 0.1},
        "b": {"learning_rate": 0.05, "local_epochs": 2, "proximal_mu": 0.1},
    }


def test_fedprox_aggregates_exactly_like_fedavg() -> None:
    deltas = mixed_deltas(3, seed=3)
    plain, prox = zeros_like(deltas[0]), zeros_like(deltas[0])
    run_round(build_strategy("fedavg"), plain, uploads(deltas))
    run_round(build_strategy("fedprox", {"mu": "1"}), prox, uploads(deltas))
    assert_equal_states(prox, plain)


def test_fedavg_sends_the_base_config_unchanged() -> None:
    configs = build_strategy("fedavg").configure(1, ["a"], {"learning_rate": 0.1})
    assert configs == {"a": {"learning_rate": 0.1}}


# ---- the round's bookkeeping ------------------------------------------------------------


def test_an_upload_is_accepted_once_per_round() -> None:
    delta = {"w": torch.ones(2)}
    aggregator = build_strategy("fedavg").begin_round(4, Manifest.of(delta))
    aggregator.accept(InMemoryUpload("a", 1, delta))
    with pytest.raises(StrategyError, match="round 4: client 'a' was already accepted"):
        aggregator.accept(InMemoryUpload("a", 1, delta))
    assert len(aggregator.reports) == 1


def test_an_upload_of_another_model_is_refused_naming_the_tensor() -> None:
    aggregator = build_strategy("median").begin_round(1, Manifest.of({"w": torch.ones(2)}))
    expected = "tensor 'w': expected float32\\[2\\], got float32\\[3\\]"
    with pytest.raises(StrategyError, match=expected):
        aggregator.accept(InMemoryUpload("a", 1, {"w": torch.ones(3)}))


@pytest.mark.parametrize("claimed", [0, -1, 1 << 53, True])
def test_a_claimed_example_count_outside_1_to_2_53_is_refused(claimed: int) -> None:
    delta = {"w": torch.ones(1)}
    aggregator = build_strategy("fedavg").begin_round(1, Manifest.of(delta))
    upload = InMemoryUpload("a", claimed, delta)
    with pytest.raises(StrategyError, match="client 'a': num_examples must be an integer"):
        aggregator.accept(upload)
    assert not upload.released  # refused: the caller still owns it


def test_finish_without_uploads_is_refused_and_changes_nothing() -> None:
    model = {"w": torch.ones(1)}
    aggregator = build_strategy("fedavg").begin_round(2, Manifest.of(model))
    with pytest.raises(StrategyError, match="round 2: no upload was accepted"):
        aggregator.finish(model)
    assert model["w"].item() == 1.0


def test_an_aggregator_is_finished_once() -> None:
    model = {"w": torch.ones(1)}
    aggregator = build_strategy("fedavg").begin_round(1, Manifest.of(model))
    aggregator.accept(InMemoryUpload("a", 1, {"w": torch.ones(1)}))
    aggregator.finish(model)
    with pytest.raises(StrategyError, match="already closed"):
        aggregator.finish(model)
    with pytest.raises(StrategyError, match="already closed"):
        aggregator.accept(InMemoryUpload("b", 1, {"w": torch.ones(1)}))
    assert model["w"].item() == 2.0


class FailingUpload(InMemoryUpload):
    """Reads fail after ``ok`` blocks: a staged file that went bad half-way."""

    def __init__(self, ok: int, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.ok = ok

    def read(self, name: str, start: int, count: int) -> torch.Tensor:
        if self.reads >= self.ok:
            raise OSError("disk read failed")
        return super().read(name, start, count)


def test_a_fold_that_fails_half_way_breaks_the_round_instead_of_using_a_partial_sum() -> None:
    deltas = mixed_deltas(2, seed=4)
    model = zeros_like(deltas[0])
    aggregator = build_strategy("fedavg").begin_round(5, Manifest.of(model))
    aggregator.accept(InMemoryUpload("a", 1, deltas[0]))
    with pytest.raises(OSError, match="disk read failed"):
        aggregator.accept(FailingUpload(2, "b", 1, deltas[1]))
    with pytest.raises(StrategyError, match="round 5: aggregation is broken: .*client 'b'"):
        aggregator.finish(model)
    assert_equal_states(model, zeros_like(deltas[0]))


def test_discard_releases_every_kept_upload() -> None:
    deltas = mixed_deltas(3, seed=5)
    staged_uploads = uploads(deltas)
    aggregator = build_strategy("trimmed-mean").begin_round(1, Manifest.of(deltas[0]))
    for upload in staged_uploads:
        aggregator.accept(upload)
    assert not any(upload.released for upload in staged_uploads)  # robust rules keep them
    aggregator.discard()
    assert all(upload.released for upload in staged_uploads)


# ---- the adapter over today's UploadReceiver ---------------------------------------------


@pytest.mark.parametrize("spool_memory_bytes", [1 << 20, 0])
def test_receiver_upload_reads_any_block_of_any_tensor(
    spool_memory_bytes: int, tmp_path: Path
) -> None:
    delta = mixed_deltas(1, seed=6)[0] | {"empty": torch.zeros(0, 2)}
    upload = ReceiverUpload(staged(delta, spool_memory_bytes, tmp_path), "a", 3, {"loss": 1.0})
    assert (upload.client_id, upload.num_examples, upload.metrics) == ("a", 3, {"loss": 1.0})
    assert upload.manifest == Manifest.of(delta)
    for name, tensor in delta.items():
        flat = tensor.reshape(-1)
        for start, count in [(0, flat.numel()), (1, max(0, flat.numel() - 2)), (flat.numel(), 0)]:
            if start + count <= flat.numel():
                got = upload.read(name, start, count)
                assert got.dtype == tensor.dtype
                assert torch.equal(got, flat[start : start + count]), name


def test_receiver_upload_refuses_a_block_outside_the_tensor() -> None:
    upload = ReceiverUpload(staged({"w": torch.ones(4)}), "a", 1)
    with pytest.raises(ValueError, match="tensor 'w': elements \\[3, 5\\) are outside its 4"):
        upload.read("w", 3, 2)
    with pytest.raises(KeyError, match="'v'"):
        upload.read("v", 0, 1)


def test_receiver_upload_needs_a_complete_upload() -> None:
    receiver = UploadReceiver(Manifest.of({"w": torch.ones(4)}))
    with pytest.raises(ValueError, match="client 'a': the upload is not complete"):
        ReceiverUpload(receiver, "a", 1)


def test_receiver_upload_release_closes_the_staged_file(tmp_path: Path) -> None:
    receiver = staged({"w": torch.ones(1000)}, 0, tmp_path)
    upload = ReceiverUpload(receiver, "a", 1)
    upload.release()
    upload.release()  # idempotent
    with pytest.raises(ValueError, match="released"):
        upload.read("w", 0, 1)


def test_reads_reuse_one_buffer_but_a_kept_view_stays_valid_when_it_grows() -> None:
    upload = ReceiverUpload(staged({"w": torch.arange(10.0)}), "a", 1)
    small = upload.read("w", 0, 2)
    kept = small.clone()
    big = upload.read("w", 0, 10)  # grows: a new buffer, the old view is untouched
    assert torch.equal(small, kept)
    assert torch.equal(big, torch.arange(10.0))
