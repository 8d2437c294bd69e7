"""Upload staging: a delta reaches the running sum only when every byte of it is sound.

The receiver is driven exactly as the coordinator drives it: chunks, the trailer
(``finish``), ``check_finite``, then ``fold_into``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch
from fedstream.common.codec import Manifest, crc32_of, iter_payload
from fedstream.common.errors import UploadRejected
from fedstream.server import upload
from fedstream.server.aggregate import DeltaAccumulator
from fedstream.server.upload import UploadReceiver


def make_delta(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "conv.weight": torch.randn(8, 1, 3, 3, generator=gen),
        "bn.running_var": torch.rand(8, generator=gen).half(),
        "proj": torch.randn(5, generator=gen).bfloat16(),
        "bn.num_batches_tracked": torch.tensor(12),
        "empty": torch.zeros(0, 3),
        "head.bias": torch.randn(3, generator=gen, dtype=torch.float64),
    }


def stage(
    receiver: UploadReceiver, state: Mapping[str, torch.Tensor], chunk_bytes: int = 64
) -> None:
    """Send ``state`` through ``receiver`` and its trailer, as a well-behaved client would."""
    manifest = receiver.manifest
    for chunk in iter_payload(state, manifest, chunk_bytes):
        receiver.add_chunk(chunk)
    receiver.finish(manifest.total_bytes, crc32_of(state, manifest))


def commit(receiver: UploadReceiver, accumulator: DeltaAccumulator, weight: int) -> None:
    """The coordinator's order: refuse non-finite deltas first, then fold."""
    receiver.check_finite()
    receiver.fold_into(accumulator, weight)


def assert_same_sum(got: DeltaAccumulator, want: DeltaAccumulator) -> None:
    assert got.total_weight == want.total_weight
    assert got.num_folded == want.num_folded
    expected = want.average()
    for name, tensor in got.average().items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0, msg=name)


def assert_untouched(accumulator: DeltaAccumulator) -> None:
    assert accumulator.total_weight == 0
    assert accumulator.num_folded == 0
    with pytest.raises(ValueError):
        accumulator.average()


def files_open_under(folder: Path) -> list[str]:
    """Targets of this process's open descriptors that live in ``folder`` (Linux /proc)."""
    prefix = str(folder.resolve()) + os.sep
    targets = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(prefix):
            targets.append(target)
    return targets


@pytest.fixture
def delta() -> dict[str, torch.Tensor]:
    return make_delta()


@pytest.fixture
def manifest(delta: dict[str, torch.Tensor]) -> Manifest:
    return Manifest.of(delta)


def test_valid_upload_folds_exactly_like_fold_state(
    delta: dict[str, torch.Tensor], manifest: Manifest
) -> None:
    other = make_delta(seed=1)
    expected = DeltaAccumulator(manifest)
    expected.fold_state(delta, 3)
    expected.fold_state(other, 5)

    accumulator = DeltaAccumulator(manifest)
    for state, weight in ((delta, 3), (other, 5)):
        receiver = UploadReceiver(manifest)
        stage(receiver, state)
        commit(receiver, accumulator, weight)
        receiver.close()
    assert_same_sum(accumulator, expected)


def test_upload_read_back_in_many_blocks_folds_like_fold_state(
    monkeypatch: pytest.MonkeyPatch, delta: dict[str, torch.Tensor], manifest: Manifest
) -> None:
    # Tiny read blocks so every tensor is folded in several slices at increasing offsets.
    monkeypatch.setattr(upload, "READ_BLOCK_BYTES", 8)
    expected = DeltaAccumulator(manifest)
    expected.fold_state(delta, 4)
    accumulator = DeltaAccumulator(manifest)
    receiver = UploadReceiver(manifest)
    stage(receiver, delta, chunk_bytes=5)
    commit(receiver, accumulator, 4)
    assert_same_sum(accumulator, expected)


def test_stream_longer_than_the_manifest_is_rejected(
    delta: dict[str, torch.Tensor], manifest: Manifest
) -> None:
    receiver = UploadReceiver(manifest)
    for chunk in iter_payload(delta, manifest, 64):
        receiver.add_chunk(chunk)
    with pytest.raises(UploadRejected, match="more than"):
        receiver.add_chunk(b"\x00")


def test_chunk_after_the_trailer_is_rejected(
    delta: dict[str, torch.Tensor], manifest: Manifest
) -> None:
    receiver = UploadReceiver(manifest)
    stage(receiver, delta)
    with pytest.raises(UploadRejected):
        receiver.add_chunk(b"")


def test_truncated_stream_is_rejected_as_checksum(
    delta: dict[str, torch.Tensor], manifest: Manifest
) -> None:
    receiver = UploadReceiver(manifest)
    chunks = list(iter_payload(delta, manifest, 64))
    for chunk in chunks[:-1]:
        receiver.add_chunk(chunk)
    with pytest.raises(UploadRejected) as caught:
        receiver.finish(manifest.total_bytes, crc32_of(delta, manifest))
    assert caught.value.reason == "checksum"


def test_corrupted_byte_is_rejected_as_checksum(
    delta: dict[str, torch.Tensor], manifest: Manifest
) -> None:
    receiver = UploadReceiver(manifest)
    chunks = list(iter_payload(delta, manifest, 64))
    corrupt = bytearray(chunks[0])
    corrupt[10] ^= 0x40
    chunks[0] = bytes(corrupt)
    for chunk in chunks:
        receiver.add_chunk(chunk)
    with pytest.raises(UploadRejected) as caught:
        receiver.finish(manifest.total_bytes, crc32_of(delta, manifest))
    assert caught.value.reason == "checksum"


def test_trailer_disagreeing_with_the_manifest_is_rejected(
    delta: dict[str, torch.Tensor], manifest: Manifest
) -> None:
    receiver = UploadReceiver(manifest)
    for chunk in iter_payload(delta, manifest, 64):
        receiver.add_chunk(chunk)
    with pytest.raises(UploadRejected) as caught:
        receiver.finish(manifest.total_bytes + 8, crc32_of(delta, manifest))
    assert caught.value.reason == "malformed"


def test_incomplete_upload_cannot_be_folded(
    delta: dict[str, torch.Tensor], manifest: Manifest
) -> None:
    receiver = UploadReceiver(manifest)
    for chunk in iter_payload(delta, manifest, 64):
        receiver.add_chunk(chunk)
    accumulator = DeltaAccumulator(manifest)
    with pytest.raises(UploadRejected):
        receiver.fold_into(accumulator, 3)
    assert_untouched(accumulator)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("name", ["conv.weight", "bn.running_var", "proj", "head.bias"])
def test_non_finite_value_is_rejected_and_never_folded(
    delta: dict[str, torch.Tensor], manifest: Manifest, name: str, bad: float
) -> None:
    delta[name].view(-1)[-1] = bad
    receiver = UploadReceiver(manifest)
    stage(receiver, delta)
    accumulator = DeltaAccumulator(manifest)
    with pytest.raises(UploadRejected, match=name) as caught:
        commit(receiver, accumulator, 3)
    assert caught.value.reason == "non_finite"
    assert_untouched(accumulator)


def test_non_finite_value_in_a_later_block_is_found(
    monkeypatch: pytest.MonkeyPatch, delta: dict[str, torch.Tensor], manifest: Manifest
) -> None:
    monkeypatch.setattr(upload, "READ_BLOCK_BYTES", 16)  # conv.weight: 72 floats, 18 blocks
    delta["conv.weight"].view(-1)[70] = float("nan")
    receiver = UploadReceiver(manifest)
    stage(receiver, delta)
    with pytest.raises(UploadRejected) as caught:
        receiver.check_finite()
    assert caught.value.reason == "non_finite"


@pytest.mark.parametrize("spool_memory_bytes", [1, 100])
def test_upload_spilled_to_disk_folds_the_same(
    tmp_path: Path, delta: dict[str, torch.Tensor], manifest: Manifest, spool_memory_bytes: int
) -> None:
    assert manifest.total_bytes > 100
    expected = DeltaAccumulator(manifest)
    expected.fold_state(delta, 2)
    accumulator = DeltaAccumulator(manifest)
    receiver = UploadReceiver(manifest, spool_memory_bytes=spool_memory_bytes, spool_dir=tmp_path)
    stage(receiver, delta, chunk_bytes=32)
    assert files_open_under(tmp_path), "the upload should have spilled into spool_dir"
    commit(receiver, accumulator, 2)
    receiver.close()
    assert_same_sum(accumulator, expected)
    assert not files_open_under(tmp_path)


def test_upload_with_zero_spool_memory_folds_the_same(
    tmp_path: Path, delta: dict[str, torch.Tensor], manifest: Manifest
) -> None:
    expected = DeltaAccumulator(manifest)
    expected.fold_state(delta, 2)
    accumulator = DeltaAccumulator(manifest)
    receiver = UploadReceiver(manifest, spool_memory_bytes=0, spool_dir=tmp_path)
    stage(receiver, delta, chunk_bytes=32)
    commit(receiver, accumulator, 2)
    receiver.close()
    assert_same_sum(accumulator, expected)


def test_zero_spool_memory_stages_the_upload_on_disk(
    tmp_path: Path, delta: dict[str, torch.Tensor], manifest: Manifest
) -> None:
    receiver = UploadReceiver(manifest, spool_memory_bytes=0, spool_dir=tmp_path)
    try:
        stage(receiver, delta, chunk_bytes=32)
        assert files_open_under(tmp_path)
    finally:
        receiver.close()


@pytest.mark.parametrize("chunk_bytes", [1, 3, 7, 4096])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_scanner_finds_nan_across_any_chunk_boundary(chunk_bytes: int, dtype: torch.dtype) -> None:
    from fedstream.server.upload import FiniteScanner

    state = {
        "steps": torch.tensor([5], dtype=torch.int64),
        "odd": torch.ones(3, dtype=torch.int8),  # leaves padding before the next tensor
        "w": torch.ones(37, dtype=dtype),
    }
    state["w"][29] = float("nan")
    manifest = Manifest.of(state)
    scanner = FiniteScanner(manifest)
    for chunk in iter_payload(state, manifest, chunk_bytes):
        scanner.feed(chunk)
    assert scanner.first_bad == "w"


@pytest.mark.parametrize("chunk_bytes", [1, 5, 4096])
def test_scanner_passes_finite_payloads_and_ignores_integer_bit_patterns(chunk_bytes: int) -> None:
    from fedstream.server.upload import FiniteScanner

    # An int32 whose bits spell a float NaN must not be mistaken for one.
    state = {"ids": torch.tensor([0x7FC00000], dtype=torch.int32), "w": torch.randn(50)}
    manifest = Manifest.of(state)
    scanner = FiniteScanner(manifest)
    for chunk in iter_payload(state, manifest, chunk_bytes):
        scanner.feed(chunk)
    assert scanner.first_bad is None


@pytest.mark.parametrize("chunk_bytes", [1, 3, 4096])
@pytest.mark.parametrize(
    ("name", "value", "dtype"),
    [
        ("w", 1e30, torch.float32),
        ("w", -2e15, torch.float64),
        ("steps", 2**62, torch.int64),
        ("steps", -(2**63), torch.int64),  # abs() of this wraps around: both ends are checked
    ],
)
def test_scanner_refuses_values_beyond_the_bound(
    chunk_bytes: int, name: str, value: float, dtype: torch.dtype
) -> None:
    from fedstream.server.upload import FiniteScanner

    state = {
        "steps": torch.tensor([5, 7], dtype=torch.int64),
        "flags": torch.tensor([True, False]),  # bool: never out of range
        "w": torch.ones(9, dtype=torch.float64 if name == "w" else torch.float32),
    }
    state[name] = state[name].to(dtype)
    state[name][1] = value
    manifest = Manifest.of(state)
    scanner = FiniteScanner(manifest, max_abs=1e15)
    for chunk in iter_payload(state, manifest, chunk_bytes):
        scanner.feed(chunk)
    assert scanner.first_bad == name
    assert scanner.reason == "out_of_range" and "--max-update-abs" in scanner.problem


def test_receiver_names_the_tensor_and_the_value_beyond_the_bound() -> None:
    delta = {"w": torch.tensor([1.0, -3e20, 2.0])}
    manifest = Manifest.of(delta)
    receiver = UploadReceiver(manifest, max_abs=1e15)
    try:
        stage(receiver, delta)
        with pytest.raises(UploadRejected, match=r"'w' holds -3e\+20, beyond the bound of 1e\+15"):
            receiver.check_finite()
    finally:
        receiver.close()


def test_nan_is_reported_as_non_finite_not_as_out_of_range() -> None:
    delta = {"w": torch.tensor([1e30, float("nan")])}
    manifest = Manifest.of(delta)
    receiver = UploadReceiver(manifest, max_abs=1e15)
    try:
        stage(receiver, delta)
        with pytest.raises(UploadRejected, match="NaN or Inf") as refused:
            receiver.check_finite()
        assert refused.value.reason == "non_finite"
    finally:
        receiver.close()
