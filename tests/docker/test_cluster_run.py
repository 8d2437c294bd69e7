"""docker/docker-compose.yml run for real: the image built, the containers started by the
Compose CLI, the federation trained, and then a client and the server killed.

These need root and a Docker engine; `make test-cluster` runs them (tests/docker/engine.py
installs what is missing and starts dockerd). Each test is a compose project of its own on
its own network; the one published port is bound to 127.0.0.1.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from fedstream.server.checkpoint import load_checkpoint

from tests.docker.engine import Ran, image_size_bytes, run
from tests.docker.project import Project, metrics, windows

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(2400)]

# Every container trains with one thread: 3 clients and a server share this machine's cores.
THREADS = {"FL_CLIENT_NUM_THREADS": "1"}
# "127.0.0.1:" + ":50051" is "127.0.0.1::50051": a free port on the host's loopback.
LOOPBACK_ANY_PORT = {"FL_PUBLISH": "127.0.0.1:"}


MakeProject = Callable[..., Project]


@pytest.fixture
def project_factory(
    compose_cli: list[str], cluster_image: str, tmp_path: Path
) -> Iterator[MakeProject]:
    made: list[Project] = []

    def make(knobs: dict[str, str], overrides: tuple[Path, ...] = ()) -> Project:
        project = Project(compose_cli, cluster_image, tmp_path, knobs, overrides)
        made.append(project)
        return project

    yield make
    for project in made:
        project.down()


def override(tmp_path: Path, name: str, document: dict[str, object]) -> Path:
    """A compose file passed after docker-compose.yml, as the README shows users."""
    path = tmp_path / name
    path.write_text(json.dumps(document), encoding="utf-8")  # JSON is YAML
    return path


def test_image_runs_as_a_user_and_holds_no_build_tools(cluster_image: str) -> None:
    user = run(["docker", "image", "inspect", "--format", "{{.Config.User}}", cluster_image],
               timeout=60).stdout.strip()
    assert user.split(":")[0] == "10001", user
    probe = run(["docker", "run", "--rm", cluster_image, "sh", "-c",
                 "id -u; for c in fl-server fl-client fl-healthcheck; do command -v $c; done; "
                 "echo tools: $(for t in gcc cc make git; do command -v $t; done); "
                 "ls -d /src /wheels 2>/dev/null"],
                timeout=120, check=False).stdout.splitlines()
    assert probe[0] == "10001", probe
    assert probe[1:4] == [f"/opt/fedstream/bin/{c}" for c in
                          ("fl-server", "fl-client", "fl-healthcheck")], probe
    # No compiler or VCS, and neither the source tree nor the wheels left the builder.
    assert probe[4:] == ["tools:"], probe
    assert image_size_bytes(cluster_image) > 0


def test_cluster_trains_three_rounds_with_three_clients(
    project_factory: MakeProject, tmp_path: Path
) -> None:
    project = project_factory({"FL_CLIENTS": "3", "FL_ROUNDS": "3", **THREADS,
                               **LOOPBACK_ANY_PORT})
    project.up()
    (server,) = project.containers("server")
    clients = project.containers("client")
    assert len(clients) == 3

    # The port is published on the host's loopback only.
    bindings = project.inspect(server)["NetworkSettings"]["Ports"]["50051/tcp"]
    assert [b["HostIp"] for b in bindings] == ["127.0.0.1"], bindings

    codes = project.wait_all(timeout=900)
    logs = {cid: project.logs(cid) for cid in codes}
    assert all(code == 0 for code in codes.values()), (codes, logs)

    # The clients started only once the health check (fl-healthcheck) passed.
    health = project.inspect(server)["State"]["Health"]["Log"]
    assert any(entry["ExitCode"] == 0 and "SERVING" in entry["Output"] for entry in health)

    run_folder = project.copy_out(server, "/runs/cluster")
    history = metrics(run_folder)
    assert [r["round"] for r in history] == [1, 2, 3]
    for record in history:
        assert record["selected"] == record["succeeded"] == 3, record
        # Truly parallel: every round's local training windows overlap in time.
        spans = list(windows(record))
        assert max(s for s, _ in spans) < min(f for _, f in spans), (record["round"], spans)
    assert history[-1]["accuracy"] > 0.5, history[-1]

    checkpoint = tmp_path / "checkpoint.pt"
    checkpoint.write_bytes(run_folder["checkpoint.pt"])
    round_number, meta, state = load_checkpoint(checkpoint)
    assert round_number == 3 and meta["dataset"] == "digits"
    assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point())
    # Each client trained its own shard: the server handed out partitions 0, 1 and 2.
    shards = sorted(int(line.split("shard ")[1].split()[0])
                    for cid in clients for line in logs[cid].splitlines() if " shard " in line)
    assert shards == [0, 1, 2], shards


def test_round_completes_without_a_killed_client(
    project_factory: MakeProject, tmp_path: Path
) -> None:
    # Three clients, of which two make a round count; rounds long enough to kill one in.
    slow = override(tmp_path, "kill-client.yml", {"services": {"server": {"environment": {
        "FL_SERVER_MIN_CLIENTS": "2", "FL_SERVER_NUM_PARTITIONS": "3",
        "FL_SERVER_LOCAL_EPOCHS": "5"}}}})
    project = project_factory({"FL_CLIENTS": "3", "FL_ROUNDS": "3", **THREADS,
                               **LOOPBACK_ANY_PORT}, (slow,))
    project.up()
    (server,) = project.containers("server")
    victim, *survivors = project.containers("client")
    project.follow(victim, "victim").wait_for(r"round 2: received global model, training",
                                              timeout=600)
    run(["docker", "kill", victim], timeout=60)

    codes = project.wait_all(timeout=900)
    logs = {cid: project.logs(cid) for cid in codes}
    assert codes[victim] == 137, codes  # SIGKILL
    assert codes[server] == 0 and all(codes[c] == 0 for c in survivors), (codes, logs)

    history = metrics(project.copy_out(server, "/runs/cluster"))
    assert [r["round"] for r in history] == [1, 2, 3]
    by_round = {r["round"]: r for r in history}
    # The client id defaults to host name (the container's short id) and process id.
    victim_host = project.inspect(victim)["Config"]["Hostname"]
    killed_in = by_round[2]
    assert killed_in["succeeded"] == 2, killed_in
    assert [c for c in killed_in["failures"] if c.startswith(victim_host)], killed_in
    assert by_round[3]["succeeded"] == 2, by_round[3]


def test_killed_server_resumes_from_its_volume(
    project_factory: MakeProject, tmp_path: Path
) -> None:
    slow = override(tmp_path, "slow.yml", {"services": {"server": {"environment": {
        "FL_SERVER_LOCAL_EPOCHS": "5"}}}})
    project = project_factory({"FL_CLIENTS": "2", "FL_ROUNDS": "4", **THREADS,
                               **LOOPBACK_ANY_PORT}, (slow,))
    project.up()
    (server,) = project.containers("server")
    first = project.follow(server, "server-1")
    first.wait_for(r"round 2/4 ", timeout=600)  # round 2 is checkpointed
    run(["docker", "kill", server], timeout=60)
    assert project.inspect(server)["State"]["ExitCode"] == 137

    # The same container, so the same volume; the clients are still up, retrying.
    restart: Ran = project.cli("start", "server")
    assert restart.returncode == 0
    second = project.follow(server, "server-2")
    resumed = int(second.wait_for(r"resuming after round (\d+)", timeout=300).group(1))
    assert resumed >= 2

    codes = project.wait_all(timeout=900)
    logs = {cid: project.logs(cid) for cid in codes}
    assert all(code == 0 for code in codes.values()), (codes, logs)
    history = metrics(project.copy_out(server, "/runs/cluster"))
    # Every round once: none lost to the kill, none trained twice into the log.
    assert [r["round"] for r in history] == [1, 2, 3, 4], history
    for cid in project.containers("client"):
        assert "server finished the run" in logs[cid], logs[cid]
