"""Real fl-server and fl-client processes over loopback sockets."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fedstream.common.data import load_digits
from fedstream.common.models import build_model
from fedstream.common.tasks.classification import ClassificationTask, evaluate_split
from fedstream.server.checkpoint import load_checkpoint

from tests.procs import Cluster, Proc, client_argv, free_port, read_metrics, server_argv
from tests.procs import start_fl_server as start_server

pytestmark = pytest.mark.e2e

def test_federation_of_three_parallel_clients_trains_digits(cluster: Cluster, tmp_path: Path):
    out = tmp_path / "run"
    server, port = start_server(
        cluster, out, "--rounds", "4", "--min-clients", "3", "--round-timeout", "120"
    )
    clients = [
        cluster.start(
            f"client-{i}",
            client_argv(
                "--server", f"127.0.0.1:{port}", "--client-id", f"c{i}", "--num-threads", "1"
            ),
        )
        for i in range(3)
    ]
    assert server.wait(timeout=240) == 0, server.output()
    for client in clients:
        assert client.wait(timeout=60) == 0, client.output()
        assert "server finished the run" in client.output()

    history = read_metrics(out)
    assert [r["round"] for r in history] == [1, 2, 3, 4]
    assert all(r["succeeded"] == 3 for r in history)
    assert history[-1]["accuracy"] > 0.90, history[-1]

    # The checkpoint is a plain state dict of the tensors that travel (every floating-
    # point one): it loads into a fresh model and scores what the server logged.
    round_number, meta, state = load_checkpoint(out / "checkpoint.pt")
    assert round_number == 4 and meta["dataset"] == "digits" and meta["task"] == "classification"
    data = load_digits(seed=0, test_fraction=0.2)
    model = build_model("cnn", data.input_shape, data.num_classes, seed=123)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert unexpected == [] and all(name.endswith("num_batches_tracked") for name in missing)
    server_data = ClassificationTask(seed=0).server_data()
    accuracy = evaluate_split(model, server_data, torch.device("cpu"))["accuracy"]
    assert accuracy == pytest.approx(history[-1]["accuracy"])
    # Federated evaluation: every client scored the final model on its own held-out shard
    # (together the server's held-out split), and the round records their weighted mean.
    last = history[-1]
    assert len(last["evaluations"]) == 3
    counts = [e["num_examples"] for e in last["evaluations"]]
    assert sum(counts) == len(server_data.test_y)
    expected = sum(e["num_examples"] * e["metrics"]["accuracy"] for e in last["evaluations"])
    assert last["federated_eval"]["accuracy"] == pytest.approx(expected / sum(counts))
    assert last["federated_eval"]["accuracy"] == pytest.approx(accuracy)

    # Parallelism: in every round, the clients' local training windows overlap in time.
    for record in history:
        windows = [
            (c["train_started_unix_s"], c["train_finished_unix_s"]) for c in record["clients"]
        ]
        latest_start = max(start for start, _ in windows)
        earliest_finish = min(finish for _, finish in windows)
        assert latest_start < earliest_finish, f"round {record['round']}: {windows}"


def test_round_completes_when_a_client_is_killed_mid_round(cluster: Cluster, tmp_path: Path):
    out = tmp_path / "run"
    server, port = start_server(
        cluster, out, "--rounds", "3", "--min-clients", "2", "--round-timeout", "120",
        "--log-level", "DEBUG",  # per-upload lines
    )  # fmt: skip
    address = f"127.0.0.1:{port}"
    # The victim joins first and trains far longer than the others, so it is in round 1
    # and the kill lands while that round is open.
    victim = cluster.start(
        "victim",
        client_argv("--server", address, "--client-id", "victim", "--local-epochs", "500",
                    "--num-threads", "1"),
    )  # fmt: skip
    server.wait_for(r"client victim is waiting for rounds", timeout=120)
    steady = [
        cluster.start(
            f"client-{i}",
            client_argv("--server", address, "--client-id", f"c{i}", "--num-threads", "1"),
        )
        for i in range(2)
    ]
    victim.wait_for(r"round 1: received global model", timeout=120)
    server.wait_for(r"round 1: client c\d uploaded", timeout=120)
    victim.signal(signal.SIGKILL)

    assert server.wait(timeout=240) == 0, server.output()
    for client in steady:
        assert client.wait(timeout=60) == 0, client.output()
    history = read_metrics(out)
    assert [r["round"] for r in history] == [1, 2, 3]
    # The victim never reported: round 1 completed (or, if only one steady client was in
    # it, was retried) without it, and the survivors carried the run.
    assert all(r["succeeded"] == 2 for r in history)
    assert all("victim" not in [c["client_id"] for c in r["clients"]] for r in history)


def test_client_started_before_server_waits_and_joins(cluster: Cluster, tmp_path: Path):
    port = free_port()
    client = cluster.start(
        "early-client",
        client_argv(
            "--server",
            f"127.0.0.1:{port}",
            "--client-id",
            "early",
            "--backoff-initial-s",
            "0.2",
            "--backoff-max-s",
            "1",
        ),
    )
    server = cluster.start(
        "server",
        server_argv(
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--out",
            str(tmp_path / "run"),
            "--rounds",
            "1",
            "--min-clients",
            "1",
        ),
    )
    assert server.wait(timeout=180) == 0, server.output()
    assert client.wait(timeout=60) == 0, client.output()
    assert read_metrics(tmp_path / "run")[0]["clients"][0]["client_id"] == "early"


def test_missing_gpu_is_a_clear_error_at_start() -> None:
    # This test machine has no GPU; on one that has, index 999 still does not exist.
    result = subprocess.run(
        client_argv("--server", "127.0.0.1:1", "--gpu", "999"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "--gpu 999" in result.stderr


def test_local_launcher_runs_a_federation_and_prefixes_output(tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedstream.server.launcher",
            "--clients",
            "2",
            "--rounds",
            "2",
            "--out",
            str(out),
            "--verbose",  # client logs too, so every role's prefix shows
        ],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "[server]" in result.stdout and "[client-1]" in result.stdout
    assert "round 2/2" in result.stdout
    assert "final accuracy" in result.stdout
    assert len(read_metrics(out)) == 2


def _children_of(pid: int) -> list[int]:
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


def test_ctrl_c_stops_the_whole_local_federation(cluster: Cluster, tmp_path: Path) -> None:
    launcher = cluster.start(
        "fl-local",
        [sys.executable, "-m", "fedstream.server.launcher", "--clients", "2", "--rounds", "500",
         "--out", str(tmp_path / "run")],
    )  # fmt: skip
    launcher.wait_for(r"round 1/500", timeout=180)
    children = _children_of(launcher.process.pid)
    assert len(children) == 3  # the server and two clients
    launcher.process.send_signal(signal.SIGINT)  # what Ctrl-C delivers to the launcher
    assert launcher.wait(timeout=60) == 130
    for pid in children:
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(
            f"/proc/{pid}/status"
        ).read_text(), f"process {pid} survived Ctrl-C"


def _launcher(cluster: Cluster, tmp_path: Path, clients: int, *server_flags: str,
              env: dict[str, str] | None = None) -> Proc:
    return cluster.start(
        "fl-local",
        [sys.executable, "-m", "fedstream.server.launcher", "--clients", str(clients),
         "--rounds", "2", "--out", str(tmp_path / "run"), "--", *server_flags],
        env,
    )  # fmt: skip


def test_local_launcher_stops_when_every_client_has_died(cluster: Cluster, tmp_path: Path):
    # FL_CLIENT_* reaches only the clients: each exits 2 at start, the server would wait
    # its whole --join-timeout for them.
    launcher = _launcher(cluster, tmp_path, 2, env={"FL_CLIENT_BATCH_SIZE": "0"})
    assert launcher.wait(timeout=90) == 1, launcher.output()
    output = launcher.output()
    for role in ("client-0", "client-1"):
        assert f"fl-local: {role} exited with status 2; its last lines:" in output
    assert "batch_size" in output.split("its last lines:", 1)[1]  # the client's own words
    assert "fl-local: every client exited before the run ended" in output


def test_local_launcher_stops_the_clients_when_the_server_exits_at_start(
    cluster: Cluster, tmp_path: Path
):
    launcher = _launcher(cluster, tmp_path, 4, "--round-timeout", "-1")
    # Before, each client was given 30 s to exit by itself: two minutes for four.
    assert launcher.wait(timeout=60) == 2, launcher.output()
    output = launcher.output()
    assert "fl-local: server exited with status 2; its last lines:" in output
    assert "round_timeout" in output


def test_client_restarted_without_an_id_takes_the_shard_its_old_self_left(
    cluster: Cluster, tmp_path: Path
):
    out = tmp_path / "run"
    server, port = start_server(
        cluster, out, "--rounds", "3", "--min-clients", "2", "--round-timeout", "120",
    )  # fmt: skip
    flags = ("--server", f"127.0.0.1:{port}", "--num-threads", "1", "--max-steps", "5")
    first = cluster.start("first", client_argv(*flags))
    server.wait_for(r"client \S+ joined \(partition 0\)", timeout=120)
    second = cluster.start("second", client_argv(*flags))
    leaver = server.wait_for(r"client (\S+) joined \(partition 1\)", timeout=120)[1]
    server.wait_for(r"round 1/3", timeout=120)
    second.kill()  # the process holding shard 1; it comes back under a new id
    restarted = cluster.start("restarted", client_argv(*flags))
    taker = server.wait_for(rf"client (\S+) takes data shard 1, left by {leaver}", timeout=120)
    assert taker[1] != leaver
    server.wait_for(rf"client {taker[1]} joined \(partition 1\)")
    assert server.wait(timeout=240) == 0, server.output()
    assert first.wait(timeout=60) == 0 and restarted.wait(timeout=60) == 0
    assert "shares data shard" not in server.output()
