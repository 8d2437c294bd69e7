"""Device selection and placement. This machine has no GPU, so the GPU cases replace
torch.cuda's queries with stand-ins (the only mocks here; the H200 check runs for real
where a GPU machine is lent)."""

from __future__ import annotations

import pytest
import torch
from fedstream.client.device import configure_threads, select_device
from fedstream.common.errors import ConfigError
from fedstream.server.launcher import client_placement


def test_no_gpu_flag_means_cpu() -> None:
    assert select_device(None) == torch.device("cpu")


def test_gpu_flag_without_cuda_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="--gpu 0 was given but CUDA is not available"):
        select_device(0)


def test_gpu_index_beyond_the_machine_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ConfigError, match=r"--gpu 2 does not exist: this machine has 2 GPU\(s\)"):
        select_device(2)


def test_gpu_index_selects_and_pins_that_device(monkeypatch: pytest.MonkeyPatch) -> None:
    chosen: list[int] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    assert select_device(3) == torch.device("cuda", 3)
    assert chosen == [3]


def test_cpu_threads_follow_the_given_share() -> None:
    before = torch.get_num_threads()
    try:
        assert configure_threads(torch.device("cpu"), 1) == 1
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_launcher_places_clients_round_robin_on_gpus() -> None:
    assert client_placement(5, 2, cores=16) == [
        ["--gpu", "0"], ["--gpu", "1"], ["--gpu", "0"], ["--gpu", "1"], ["--gpu", "0"]
    ]  # fmt: skip


def test_launcher_divides_cores_among_cpu_clients() -> None:
    assert client_placement(4, 0, cores=8) == [["--num-threads", "2"]] * 4
    assert client_placement(4, 0, cores=2) == [["--num-threads", "1"]] * 4


def test_received_buffer_is_pinned_only_for_gpu_clients() -> None:
    from fedstream.common.codec import Manifest, PayloadAssembler

    manifest = Manifest.of({"w": torch.zeros(4)})
    assert not PayloadAssembler(manifest, pin_memory=False)._buffer.is_pinned()
    if not torch.cuda.is_available():
        pytest.skip("pinned host memory needs a CUDA driver; checked on the GPU machine")
    assert PayloadAssembler(manifest, pin_memory=True)._buffer.is_pinned()
