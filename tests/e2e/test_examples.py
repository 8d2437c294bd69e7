"""The examples and the Python API, run as real federations (server and client processes).

Sizes are small (2-3 clients, a few rounds) so that each test takes well under a minute
on a 2-core machine; every process runs from the repository root, where ``examples`` is
importable, as the examples' READMEs say.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import fedstream
import pytest
import torch
from fedstream.common.records import History
from fedstream.server.checkpoint import load_checkpoint

from tests.procs import Cluster, client_argv, read_metrics
from tests.procs import start_fl_server as start_server

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]


def launcher(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "fedstream.server.launcher", *args],
                            capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_run_local_returns_the_history_and_complete_run_records(tmp_path: Path) -> None:
    out = tmp_path / "digits"
    history = fedstream.run_local(rounds=3, clients=2, out=out,
                                  server_args=["--save-best", "accuracy"], timeout_s=300)
    assert isinstance(history, History) and len(history) == 3
    assert history.last("accuracy") > 0.9
    assert all(len(clients) == 2 for clients in history.clients)
    run = json.loads((out / "run.json").read_text())
    assert run["fedstream_version"] == fedstream.__version__
    assert run["task"]["name"] == "classification" and run["task"]["fingerprint"]
    assert run["settings"]["rounds"] == 3 and run["settings"]["dataset"] == "digits"
    best = json.loads((out / "best.json").read_text())
    assert best["value"] == max(history.metric("accuracy"))
    best_round, _, _ = load_checkpoint(out / "best.pt")
    assert best_round == best["round"]


def test_stop_when_ends_the_run_after_the_first_round_that_meets_it(tmp_path: Path) -> None:
    result = launcher("--clients", "2", "--rounds", "20", "--out", str(tmp_path / "r"),
                      "--", "--stop-when", "accuracy>=0.5")
    history = read_metrics(tmp_path / "r")
    assert len(history) == 1, [r["accuracy"] for r in history]
    assert "meets --stop-when accuracy>=0.5" in result.stdout


def test_regression_example_learns_the_diabetes_target(tmp_path: Path) -> None:
    from examples.regression.task import DiabetesTask

    history = fedstream.run_local(
        "examples.regression.task:DiabetesTask", rounds=10, clients=3, out=tmp_path / "reg",
        server_args=["--round-config", "learning_rate=0.005", "--batch-size", "16"],
        timeout_s=300,
    )
    # Predicting the training mean scores the target's variance on the held-out split;
    # the federated MLP must explain a good part of it (a linear fit explains ~50%).
    table = DiabetesTask().server_data()
    baseline = float(table.test_y.pow(2).mean()) * table.y_std**2
    final = history.last("server_eval.mse")
    assert final is not None and final < 0.75 * baseline, (final, baseline)
    assert history.last("federated_eval.mae") is not None


def test_lora_example_sends_only_the_adapters(tmp_path: Path) -> None:
    pytest.importorskip("peft")
    from examples.lora.task import LoraTask

    out = tmp_path / "lora"
    history = fedstream.run_local("examples.lora.task:LoraTask", rounds=2, clients=2, out=out,
                                  timeout_s=300)
    model = LoraTask().build_model()
    state = model.state_dict()
    adapters = {n: t for n, t in state.items() if "lora_" in n}
    adapter_bytes = sum(t.nbytes for t in adapters.values())
    full_bytes = sum(t.nbytes for t in state.values())
    for clients in history.clients:
        assert [c["upload_bytes"] for c in clients] == [adapter_bytes, adapter_bytes]
    assert adapter_bytes * 20 < full_bytes  # a few per cent of the model travels
    _, _, saved = load_checkpoint(out / "checkpoint.pt")
    assert set(saved) == set(adapters)
    assert history.last("perplexity") is not None


def test_mnist_example_trains_on_the_idx_files(tmp_path: Path) -> None:
    data = REPO.parent / "shared" / "data"
    if not (data / "MNIST" / "raw" / "t10k-images-idx3-ubyte").exists():
        pytest.skip(f"the MNIST test split is not in {data}")
    launcher("--dataset", "examples.mnist.data:idx_test_split", "--data-dir", str(data),
             "--clients", "2", "--rounds", "2", "--out", str(tmp_path / "mnist"), timeout=600)
    history = read_metrics(tmp_path / "mnist")
    assert len(history) == 2 and history[-1]["accuracy"] > 0.85, history[-1]["accuracy"]
    assert history[-1]["server_eval"]["num_examples"] == 2000


def test_custom_loop_example_carries_its_schedule_across_rounds(tmp_path: Path) -> None:
    history = fedstream.run_local(
        "examples.custom_loop.task:ClippedDigits", rounds=3, clients=2, out=tmp_path / "c",
        server_args=["--round-config", "clip_norm=0.5", "--round-config", "lr_min=0.005",
                     "--round-config", "total_rounds=3"],
        timeout_s=300,
    )
    assert history.metric("train.lr") == pytest.approx([0.05, 0.0275, 0.005])
    assert all(value > 0 for value in history.metric("train.grad_norm_max"))
    assert history.last("accuracy") > 0.8


def test_a_client_with_another_task_refuses_and_tells_the_server(cluster: Cluster,
                                                                 tmp_path: Path) -> None:
    server, port = start_server(
        cluster, tmp_path / "run", "--task", "examples.regression.task:DiabetesTask",
        "--min-clients", "1", "--join-timeout", "120",
    )
    client = cluster.start("wrong", client_argv("--server", f"127.0.0.1:{port}",
                                                "--client-id", "wrong"))
    assert client.wait(timeout=120) == 2, client.output()
    assert ("the server runs task 'examples.regression.task:DiabetesTask', this client runs "
            "'classification'") in client.output()
    server.wait_for(r"client wrong leaves the run: task mismatch", timeout=30)


def test_version_flags_name_the_version() -> None:
    for module in ("fedstream.server", "fedstream.client"):
        result = subprocess.run([sys.executable, "-m", module, "--version"],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0
        assert f"{fedstream.__version__} (protocol 2, torch {torch.__version__}" in result.stdout
