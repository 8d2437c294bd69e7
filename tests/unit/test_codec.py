"""The codec: tensors -> aligned little-endian payload -> chunks -> tensors, with no pickle.

Every allowlisted dtype must survive a round trip bit for bit, whatever the chunk size,
and every way a stream can be wrong (too long, too short, corrupt, non-finite) must be
refused before a caller sees a tensor.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping

import pytest
import torch
from fedstream.common.codec import (
    ALIGNMENT,
    DTYPES,
    Manifest,
    PayloadAssembler,
    TensorSpec,
    crc32_of,
    decode,
    iter_payload,
    views,
)
from fedstream.common.errors import ManifestError, TransferError
from hypothesis import given, settings
from hypothesis import strategies as st


def sample(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """A tensor of ``dtype`` and ``shape`` with seeded, dtype-appropriate values."""
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=gen, dtype=torch.float64) * 100).to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, shape, generator=gen, dtype=torch.int64).to(dtype)


def round_trip(
    state: Mapping[str, torch.Tensor], chunk_bytes: int
) -> tuple[dict[str, torch.Tensor], list[bytes]]:
    """Stream ``state`` through chunks and an assembler, as a receiver would."""
    manifest = Manifest.of(state)
    chunks = list(iter_payload(state, manifest, chunk_bytes))
    assembler = PayloadAssembler(manifest)
    for chunk in chunks:
        assembler.add(chunk)
    return assembler.finish(manifest.total_bytes, crc32_of(state, manifest)), chunks


def assert_same(got: Mapping[str, torch.Tensor], want: Mapping[str, torch.Tensor]) -> None:
    assert list(got) == list(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype, name
        assert got[name].shape == tensor.shape, name
        assert torch.equal(got[name], tensor), name


def crc(chunks: Iterable[bytes]) -> int:
    value = 0
    for chunk in chunks:
        value = zlib.crc32(chunk, value)
    return value


# ---- round trips ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype_name", sorted(DTYPES))
def test_round_trip_preserves_every_allowlisted_dtype(dtype_name: str) -> None:
    dtype = DTYPES[dtype_name]
    state = {"t": sample(dtype, (3, 5), seed=1)}
    got, _ = round_trip(state, chunk_bytes=7)
    assert_same(got, state)


def test_round_trip_preserves_bfloat16_bit_patterns() -> None:
    # bfloat16 has no numpy dtype; compare the raw 16-bit patterns, not just values.
    tensor = torch.tensor([1.0, -0.0, 3.140625, 1e-38, -65280.0], dtype=torch.bfloat16)
    got, _ = round_trip({"b": tensor}, chunk_bytes=3)
    assert torch.equal(got["b"].view(torch.int16), tensor.view(torch.int16))


def test_round_trip_preserves_bool_values() -> None:
    tensor = torch.tensor([[True, False, False], [False, True, True]])
    got, _ = round_trip({"mask": tensor}, chunk_bytes=2)
    assert got["mask"].dtype == torch.bool
    assert got["mask"].tolist() == [[True, False, False], [False, True, True]]


@pytest.mark.parametrize("shape", [(0,), (3, 0), (0, 4, 2)])
def test_round_trip_keeps_zero_element_tensors_and_their_shape(shape: tuple[int, ...]) -> None:
    state = {
        "before": torch.arange(3, dtype=torch.float32),
        "empty": torch.empty(shape, dtype=torch.float16),
        "after": torch.arange(5, dtype=torch.int8),
    }
    got, _ = round_trip(state, chunk_bytes=4)
    assert_same(got, state)


def test_manifest_of_only_empty_tensors_has_an_empty_payload() -> None:
    state = {"a": torch.empty(0), "b": torch.empty(2, 0, dtype=torch.int64)}
    got, chunks = round_trip(state, chunk_bytes=16)
    assert chunks == []
    assert_same(got, state)


def test_round_trip_keeps_scalar_shape() -> None:
    state = {"step": torch.tensor(42, dtype=torch.int64), "scale": torch.tensor(0.25)}
    got, _ = round_trip(state, chunk_bytes=5)
    assert got["step"].shape == () and got["scale"].shape == ()
    assert got["step"].item() == 42 and got["scale"].item() == 0.25


def test_round_trip_of_transposed_tensor_sends_its_logical_order() -> None:
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    transposed = base.t()
    assert not transposed.is_contiguous()
    got, _ = round_trip({"t": transposed}, chunk_bytes=8)
    assert got["t"].shape == (4, 3)
    assert torch.equal(got["t"], transposed)


def test_round_trip_of_strided_slice_sends_only_the_slice() -> None:
    base = torch.arange(20, dtype=torch.int16)
    strided = base[3:13:3]  # 3, 6, 9, 12: offset storage and a stride
    got, _ = round_trip({"s": strided}, chunk_bytes=3)
    assert got["s"].tolist() == [3, 6, 9, 12]


def test_round_trip_accepts_parameters_that_require_grad() -> None:
    weight = torch.nn.Parameter(torch.randn(2, 3, generator=torch.Generator().manual_seed(0)))
    got, _ = round_trip({"w": weight}, chunk_bytes=4)
    assert not got["w"].requires_grad
    assert torch.equal(got["w"], weight.detach())


@settings(max_examples=60, deadline=None)
@given(
    tensors=st.lists(
        st.tuples(
            st.sampled_from(sorted(DTYPES)),
            st.lists(st.integers(min_value=0, max_value=5), min_size=0, max_size=3),
        ),
        min_size=1,
        max_size=5,
    ),
    chunk_bytes=st.integers(min_value=1, max_value=96),
    seed=st.integers(min_value=0, max_value=2**16),
)
def test_round_trip_property(
    tensors: list[tuple[str, list[int]]], chunk_bytes: int, seed: int
) -> None:
    state = {
        f"t{i}": sample(DTYPES[name], tuple(shape), seed + i)
        for i, (name, shape) in enumerate(tensors)
    }
    got, chunks = round_trip(state, chunk_bytes)
    assert_same(got, state)
    assert all(len(chunk) == chunk_bytes for chunk in chunks[:-1])
    assert sum(len(chunk) for chunk in chunks) == Manifest.of(state).total_bytes


def test_decode_copies_a_whole_payload_into_tensors() -> None:
    state = {"a": sample(torch.float64, (2, 2), 3), "b": sample(torch.uint8, (5,), 4)}
    manifest = Manifest.of(state)
    payload = b"".join(iter_payload(state, manifest))
    assert_same(decode(payload, manifest), state)
    assert_same(decode(bytearray(payload), manifest), state)
    assert_same(decode(memoryview(payload), manifest), state)


# ---- chunk boundaries -------------------------------------------------------------------


def test_payload_that_is_an_exact_multiple_of_the_chunk_size_has_no_short_last_chunk() -> None:
    state = {"w": torch.arange(16, dtype=torch.float32)}  # 64 bytes
    manifest = Manifest.of(state)
    chunks = list(iter_payload(state, manifest, chunk_bytes=16))
    assert [len(chunk) for chunk in chunks] == [16, 16, 16, 16]


def test_one_byte_chunks_carry_the_payload_byte_by_byte() -> None:
    state = {
        "a": torch.tensor([1, 2, 3], dtype=torch.int16),
        "b": torch.tensor([7], dtype=torch.int8),
    }
    manifest = Manifest.of(state)  # a: 6 bytes, 2 bytes padding, b: 1 byte
    chunks = list(iter_payload(state, manifest, chunk_bytes=1))
    assert len(chunks) == manifest.total_bytes == 9
    assert all(len(chunk) == 1 for chunk in chunks)
    assert_same(decode(b"".join(chunks), manifest), state)


def test_chunk_larger_than_the_payload_gives_one_chunk() -> None:
    state = {"a": torch.arange(5, dtype=torch.float32), "b": torch.arange(3, dtype=torch.int8)}
    manifest = Manifest.of(state)
    chunks = list(iter_payload(state, manifest, chunk_bytes=1 << 20))
    assert len(chunks) == 1
    assert len(chunks[0]) == manifest.total_bytes == 24 + 3


def test_chunk_size_below_one_is_refused() -> None:
    state = {"a": torch.zeros(2)}
    with pytest.raises(ValueError):
        next(iter_payload(state, Manifest.of(state), chunk_bytes=0))


def test_crc_of_state_matches_crc_of_its_chunks() -> None:
    state = {"a": sample(torch.float32, (10,), 5), "b": sample(torch.bool, (3,), 6)}
    manifest = Manifest.of(state)
    assert crc32_of(state, manifest) == crc(iter_payload(state, manifest, chunk_bytes=3))


# ---- layout -----------------------------------------------------------------------------


def test_offsets_are_multiples_of_the_alignment() -> None:
    state = {
        "a": torch.zeros(3, dtype=torch.int8),  # 3 bytes
        "b": torch.zeros(1, dtype=torch.float64),  # 8 bytes
        "c": torch.zeros(5, dtype=torch.float16),  # 10 bytes
        "d": torch.zeros(0, dtype=torch.float32),  # 0 bytes
        "e": torch.zeros(1, dtype=torch.bool),  # 1 byte
    }
    manifest = Manifest.of(state)
    assert ALIGNMENT == 8
    assert manifest.offsets == (0, 8, 16, 32, 32)
    assert manifest.total_bytes == 33


def test_padding_between_tensors_is_zero_bytes() -> None:
    state = {
        "a": torch.full((3,), 0xFF, dtype=torch.uint8),
        "b": torch.full((1,), 0xFF, dtype=torch.uint8),
    }
    manifest = Manifest.of(state)
    payload = b"".join(iter_payload(state, manifest))
    assert payload == b"\xff\xff\xff" + bytes(5) + b"\xff"


def test_payload_bytes_are_little_endian() -> None:
    state = {"x": torch.tensor([0x01020304], dtype=torch.int32)}
    payload = b"".join(iter_payload(state, Manifest.of(state)))
    assert payload == b"\x04\x03\x02\x01"


def test_views_share_memory_with_the_flat_buffer() -> None:
    state = {"a": torch.zeros(2, dtype=torch.int8), "b": torch.zeros(2, dtype=torch.float32)}
    manifest = Manifest.of(state)
    buffer = torch.zeros(manifest.total_bytes, dtype=torch.uint8)
    typed = views(buffer, manifest)
    buffer[8:12] = torch.tensor([0, 0, 128, 63], dtype=torch.uint8)  # 1.0f little-endian
    assert typed["b"].tolist() == [1.0, 0.0]


def test_views_refuse_a_buffer_that_is_too_small() -> None:
    manifest = Manifest.of({"a": torch.zeros(4)})
    with pytest.raises(ManifestError):
        views(torch.zeros(15, dtype=torch.uint8), manifest)


# ---- PayloadAssembler -------------------------------------------------------------------


def streamed(
    state: Mapping[str, torch.Tensor], chunk_bytes: int = 8
) -> tuple[Manifest, list[bytes]]:
    manifest = Manifest.of(state)
    return manifest, list(iter_payload(state, manifest, chunk_bytes))


def test_assembler_refuses_bytes_beyond_the_manifest() -> None:
    manifest, chunks = streamed({"a": torch.arange(4, dtype=torch.float32)})
    assembler = PayloadAssembler(manifest)
    for chunk in chunks:
        assembler.add(chunk)
    with pytest.raises(TransferError, match="more than"):
        assembler.add(b"\x00")


def test_assembler_refuses_a_single_overlong_chunk() -> None:
    manifest, chunks = streamed({"a": torch.arange(4, dtype=torch.float32)})
    assembler = PayloadAssembler(manifest)
    with pytest.raises(TransferError):
        assembler.add(b"".join(chunks) + b"\x00")
    assert assembler.received_bytes == 0


def test_assembler_refuses_a_truncated_stream() -> None:
    state = {"a": torch.arange(4, dtype=torch.float32)}
    manifest, chunks = streamed(state)
    assembler = PayloadAssembler(manifest)
    for chunk in chunks[:-1]:
        assembler.add(chunk)
    with pytest.raises(TransferError, match="incomplete"):
        assembler.finish(manifest.total_bytes, crc32_of(state, manifest))


def test_assembler_refuses_a_trailer_that_disagrees_with_the_manifest() -> None:
    state = {"a": torch.arange(4, dtype=torch.float32)}
    manifest, chunks = streamed(state)
    assembler = PayloadAssembler(manifest)
    for chunk in chunks:
        assembler.add(chunk)
    with pytest.raises(TransferError):
        assembler.finish(manifest.total_bytes - 1, crc32_of(state, manifest))


def test_assembler_refuses_a_corrupted_byte() -> None:
    state = {"a": torch.arange(4, dtype=torch.float32)}
    manifest, chunks = streamed(state)
    corrupt = bytearray(chunks[1])
    corrupt[0] ^= 0x01
    chunks[1] = bytes(corrupt)
    assembler = PayloadAssembler(manifest)
    for chunk in chunks:
        assembler.add(chunk)
    with pytest.raises(TransferError, match="checksum"):
        assembler.finish(manifest.total_bytes, crc32_of(state, manifest))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_assembler_refuses_non_finite_floats(bad: float, dtype: torch.dtype) -> None:
    state = {"ok": torch.ones(3), "bad": torch.tensor([1.0, bad, 2.0], dtype=dtype)}
    manifest, chunks = streamed(state)
    assembler = PayloadAssembler(manifest)
    for chunk in chunks:
        assembler.add(chunk)
    with pytest.raises(TransferError, match="'bad'"):
        assembler.finish(manifest.total_bytes, crc32_of(state, manifest))


# ---- Manifest and TensorSpec ------------------------------------------------------------


BASE = Manifest(
    (
        TensorSpec("conv.weight", "float32", (4, 1, 3, 3)),
        TensorSpec("bn.num_batches_tracked", "int64", ()),
    )
)


def test_identical_manifests_have_no_difference() -> None:
    same = Manifest(tuple(BASE.specs))
    assert BASE.describe_difference(same) is None


def test_difference_names_missing_and_unexpected_tensors() -> None:
    other = Manifest((BASE.specs[0], TensorSpec("bn.running_mean", "int64", ())))
    why = BASE.describe_difference(other)
    assert why is not None
    assert "bn.num_batches_tracked" in why and "bn.running_mean" in why


def test_difference_names_the_tensor_with_a_wrong_shape() -> None:
    other = Manifest((TensorSpec("conv.weight", "float32", (4, 1, 3, 4)), BASE.specs[1]))
    why = BASE.describe_difference(other)
    assert why is not None
    assert "conv.weight" in why and "[4, 1, 3, 4]" in why


def test_difference_names_the_tensor_with_a_wrong_dtype() -> None:
    other = Manifest((TensorSpec("conv.weight", "float16", (4, 1, 3, 3)), BASE.specs[1]))
    why = BASE.describe_difference(other)
    assert why is not None
    assert "conv.weight" in why and "float16" in why


def test_difference_reports_a_different_order() -> None:
    other = Manifest((BASE.specs[1], BASE.specs[0]))
    why = BASE.describe_difference(other)
    assert why is not None and "order" in why


def test_manifest_refuses_duplicate_names() -> None:
    spec = TensorSpec("w", "float32", (2,))
    with pytest.raises(ManifestError, match="twice"):
        Manifest((spec, spec))


@pytest.mark.parametrize("dtype", ["float8", "complex64", "object", "Float32", ""])
def test_tensor_spec_refuses_dtype_names_outside_the_allowlist(dtype: str) -> None:
    with pytest.raises(ManifestError, match="not allowed"):
        TensorSpec("w", dtype, (2,))


def test_tensor_spec_refuses_negative_dimensions() -> None:
    with pytest.raises(ManifestError, match="negative"):
        TensorSpec("w", "float32", (2, -1))


def test_tensor_spec_refuses_a_shape_beyond_any_size_limit() -> None:
    # 2**80 elements: more than an int64 can count, so no receiver could ever hold it.
    with pytest.raises(ManifestError):
        TensorSpec("w", "float32", (2**40, 2**40))


def test_tensor_spec_refuses_an_empty_name() -> None:
    with pytest.raises(ManifestError):
        TensorSpec("", "float32", (2,))


def test_tensor_spec_of_refuses_a_dtype_that_cannot_be_sent() -> None:
    with pytest.raises(ManifestError, match="'z'"):
        TensorSpec.of("z", torch.zeros(2, dtype=torch.complex64))


def test_tensor_spec_byte_count() -> None:
    assert TensorSpec("w", "bfloat16", (3, 5)).nbytes == 30
    assert TensorSpec("w", "float64", ()).nbytes == 8
    assert TensorSpec("w", "bool", (4, 0)).nbytes == 0


@pytest.mark.parametrize("delta", [-1, 1])
def test_decode_refuses_a_payload_of_the_wrong_length(delta: int) -> None:
    state = {"a": torch.arange(3, dtype=torch.float32)}
    manifest = Manifest.of(state)
    payload = b"".join(iter_payload(state, manifest))
    wrong = payload[:-1] if delta < 0 else payload + b"\x00"
    with pytest.raises(ManifestError, match="bytes"):
        decode(wrong, manifest)


def test_assembler_reuses_a_buffer_of_the_right_size_only() -> None:
    state = {"w": torch.arange(6, dtype=torch.float32)}
    manifest = Manifest.of(state)
    first = PayloadAssembler(manifest)
    for chunk in iter_payload(state, manifest, 5):
        first.add(chunk)
    first.finish(manifest.total_bytes, crc32_of(state, manifest))
    second = PayloadAssembler(manifest, reuse=first.buffer)
    assert second.buffer.data_ptr() == first.buffer.data_ptr()
    doubled = {"w": state["w"] * 2}
    for chunk in iter_payload(doubled, manifest, 5):
        second.add(chunk)
    received = second.finish(manifest.total_bytes, crc32_of(doubled, manifest))
    torch.testing.assert_close(received["w"], doubled["w"])
    other = Manifest.of({"w": torch.zeros(7)})
    assert PayloadAssembler(other, reuse=first.buffer).buffer.data_ptr() != first.buffer.data_ptr()
