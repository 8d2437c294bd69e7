"""The compose cluster run across real network hosts: one Linux network namespace each.

No Docker engine runs here, so the engine's part is played by hand, as close to it as this
machine allows: every service of docker/docker-compose.yml gets its own network namespace
(its own interfaces, addresses, loopback and ports), the namespaces are wired to one
bridge the way a compose network wires containers, and each namespace's own hosts file
(``/etc/netns/<ns>/hosts``) resolves service names the way Compose's DNS does. The server
and client processes run the services' commands with the services' environment, read
from the compose file; the two volumes are folders in the test's temporary directory.
The test's traffic stays inside namespaces it made, on the private subnet 10.231.0.0/24
that exists only there.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.docker import composefile as cf
from tests.procs import Cluster

pytestmark = [pytest.mark.netns, pytest.mark.e2e]

SUBNET_PREFIX = "10.231.0."
NETNS_ETC = Path("/etc/netns")
VENV_BIN = Path(sys.executable).parent


class Unavailable(Exception):
    """This machine cannot make namespaces, bridges or veth pairs."""


def ip(*args: str) -> str:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise subprocess.CalledProcessError(
            result.returncode, ["ip", *args], result.stdout, result.stderr
        )
    return result.stdout


@dataclass(frozen=True)
class Host:
    name: str  # the compose service (or replica) name other hosts reach it by
    netns: str
    address: str


@dataclass
class Lan:
    """Namespaces joined by a bridge that lives in a namespace of its own, so nothing is
    added to the machine's own network and deleting the namespaces removes every link."""

    tag: str
    hosts: list[Host] = field(default_factory=list)
    namespaces: list[str] = field(default_factory=list)
    made_netns_etc: bool = False

    @property
    def switch(self) -> str:
        return f"fs{self.tag}-lan"

    def _add_namespace(self, name: str) -> None:
        try:
            ip("netns", "add", name)
        except subprocess.CalledProcessError as error:
            raise Unavailable(f"`ip netns add` failed: {error.stderr.strip()}") from error
        self.namespaces.append(name)

    def open(self) -> None:
        self.made_netns_etc = not NETNS_ETC.exists()
        self._add_namespace(self.switch)
        try:
            ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        except subprocess.CalledProcessError as error:
            raise Unavailable(f"cannot make a bridge: {error.stderr.strip()}") from error
        ip("-n", self.switch, "link", "set", "br0", "up")

    def add_host(self, name: str, last_octet: int) -> Host:
        host = Host(name, f"fs{self.tag}-{name}", f"{SUBNET_PREFIX}{last_octet}")
        self._add_namespace(host.netns)
        port = f"p{len(self.hosts)}"
        try:
            ip("-n", self.switch, "link", "add", port, "type", "veth",
               "peer", "name", "eth0", "netns", host.netns)
        except subprocess.CalledProcessError as error:
            raise Unavailable(f"cannot make a veth pair: {error.stderr.strip()}") from error
        ip("-n", self.switch, "link", "set", port, "master", "br0", "up")
        ip("-n", host.netns, "addr", "add", f"{host.address}/24", "dev", "eth0")
        ip("-n", host.netns, "link", "set", "eth0", "up")
        ip("-n", host.netns, "link", "set", "lo", "up")
        self.hosts.append(host)
        return host

    def write_hosts_files(self) -> None:
        """Every namespace resolves every host's name, and localhost, by its own file."""
        lines = ["127.0.0.1 localhost", "::1 localhost ip6-localhost ip6-loopback"]
        lines += [f"{host.address} {host.name}" for host in self.hosts]
        for host in self.hosts:
            folder = NETNS_ETC / host.netns
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "hosts").write_text("\n".join(lines) + "\n", encoding="utf-8")

    def run_in(self, host: Host, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", host.netns, *argv]

    def read(self, host: Host, path: str) -> str:
        # sysfs as seen from inside the namespace (ip netns exec remounts /sys there).
        return subprocess.run(
            self.run_in(host, ["cat", path]), capture_output=True, text=True, check=True,
            timeout=30,
        ).stdout

    def close(self) -> None:
        for name in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
            shutil.rmtree(NETNS_ETC / name, ignore_errors=True)
        if self.made_netns_etc:
            try:
                NETNS_ETC.rmdir()
            except OSError:
                pass  # someone else's namespace files are there now


@pytest.fixture
def lan() -> Iterator[Lan]:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    if shutil.which("ip") is None:
        pytest.skip("iproute2's `ip` is not installed")
    network = Lan(tag=secrets.token_hex(3))
    try:
        network.open()
        yield network
    except Unavailable as reason:
        pytest.skip(str(reason))
    finally:
        network.close()


def test_compose_cluster_trains_across_network_namespaces(
    lan: Lan, cluster: Cluster, tmp_path: Path
) -> None:
    # The shell of someone running `FL_ROUNDS=2 FL_CLIENTS=2 docker compose up` on a
    # 2-core machine (FL_CLIENT_NUM_THREADS is passed through to the clients).
    shell = {"FL_ROUNDS": "2", "FL_CLIENTS": "2", "FL_CLIENT_NUM_THREADS": "1"}
    services = cf.services(cf.CPU_FILE, shell)
    server_service, client_service = services["server"], services["client"]
    replicas = int(client_service["deploy"]["replicas"])
    assert replicas == 2
    volumes = {"runs": tmp_path / "runs", "data": tmp_path / "data"}
    path_env = {"PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}

    def container_env(service: dict[str, object]) -> dict[str, str]:
        folders = {target: volumes[name] for target, name in cf.mounts(service).items()}
        return {**cf.on_host(cf.environment(service, shell), folders), **path_env}

    try:
        server_host = lan.add_host("server", 1)
        client_hosts = [lan.add_host(f"client-{i}", 10 + i) for i in range(1, replicas + 1)]
    except Unavailable as reason:
        pytest.skip(str(reason))
    lan.write_hosts_files()

    server_env = container_env(server_service)
    server = cluster.start(
        "server", lan.run_in(server_host, cf.command(server_service)), env=server_env
    )
    listening = server.wait_for(r"listening on \S+:(\d+) \(model \S+, ([\d.]+) MB", timeout=120)
    port = int(listening.group(1))

    # The engine's health check, run where the engine runs it: in the server's own host,
    # with its environment. Clients start only once it passes (depends_on: service_healthy).
    probe = server_service["healthcheck"]["test"][1:]
    health = subprocess.run(
        lan.run_in(server_host, probe), env={**os.environ, **server_env},
        capture_output=True, text=True, timeout=30,
    )
    assert health.returncode == 0, health
    # From a client's host the server is a name in that host's own hosts file.
    across = subprocess.run(
        lan.run_in(client_hosts[0], [*probe, "--host", "server", "--port", str(port)]),
        env={**os.environ, **path_env}, capture_output=True, text=True, timeout=30,
    )
    assert across.returncode == 0 and f"server:{port}" in across.stdout, across

    clients = [
        cluster.start(
            host.name,
            lan.run_in(host, cf.command(client_service)),
            env=container_env(client_service),
        )
        for host in client_hosts
    ]

    assert server.wait(timeout=180) == 0, server.output()
    for client in clients:
        assert client.wait(timeout=60) == 0, client.output()
        assert "server finished the run" in client.output()
        assert "on cpu (1 threads), server server:50051" in client.output()

    out = Path(server_env["FL_SERVER_OUT"])
    assert out.is_relative_to(volumes["runs"])
    with (out / "metrics.jsonl").open(encoding="utf-8") as handle:
        history = [json.loads(line) for line in handle]
    assert [record["round"] for record in history] == [1, 2]
    assert all(record["succeeded"] == replicas for record in history), history
    assert (out / "checkpoint.pt").is_file()

    # The model really crossed the virtual wire: the server's interface sent at least the
    # global model to every client in every round.
    model_bytes = (float(listening.group(2)) - 0.005) * 1e6
    sent = int(lan.read(server_host, "/sys/class/net/eth0/statistics/tx_bytes"))
    assert sent >= len(history) * replicas * model_bytes, (sent, model_bytes)
