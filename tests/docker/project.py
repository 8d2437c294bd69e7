"""One compose project of the cluster tests: docker/docker-compose.yml, up for real.

Each test gets a project of its own (its own name, network and volumes, removed with
``down -v`` at the end), drives it with the same CLI users run, and reads its containers
through the labels every Compose version puts on them.
"""

from __future__ import annotations

import io
import json
import secrets
import subprocess
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from tests.docker import composefile as cf
from tests.docker.engine import Ran, run
from tests.procs import Proc

LABEL = "com.docker.compose"


class Project:
    def __init__(
        self,
        compose: Sequence[str],
        image: str,
        log_dir: Path,
        knobs: dict[str, str],
        overrides: Sequence[Path] = (),
    ) -> None:
        self.name = f"fstest{secrets.token_hex(4)}"
        self.files = [cf.CPU_FILE, *overrides]
        self.compose = list(compose)
        self.log_dir = log_dir
        # The file's own knobs only: every FL_* variable of the test's shell is left out.
        self.env = {"FL_IMAGE": image, **knobs}
        self.followers: list[Proc] = []

    def cli(self, *args: str, timeout: float = 300, check: bool = True) -> Ran:
        files = [arg for path in self.files for arg in ("-f", str(path))]
        return run([*self.compose, "-p", self.name, *files, *args], timeout=timeout,
                   check=check, env=self.env)

    def up(self) -> None:
        # --no-build: the session built the image once; a user's `make cluster-up` builds.
        self.cli("up", "-d", "--no-build", timeout=600)

    def containers(self, service: str) -> list[str]:
        """Ids of the service's containers, running or not, in replica order."""
        listed = run(["docker", "ps", "-a", "-q", "--no-trunc",
                      "--filter", f"label={LABEL}.project={self.name}",
                      "--filter", f"label={LABEL}.service={service}"], timeout=60).stdout
        ids = listed.split()
        return sorted(ids, key=lambda cid: int(self.inspect(cid)["Config"]["Labels"].get(
            f"{LABEL}.container-number", "0")))

    def inspect(self, container: str) -> dict[str, Any]:
        found: list[dict[str, Any]] = json.loads(
            run(["docker", "inspect", container], timeout=60).stdout)
        return found[0]

    def follow(self, container: str, name: str) -> Proc:
        """The container's log as a process whose lines can be awaited."""
        follower = Proc(name, ["docker", "logs", "--follow", container], self.log_dir)
        self.followers.append(follower)
        return follower

    def wait_all(self, timeout: float) -> dict[str, int]:
        """Block until every container of the project has stopped: id -> exit code."""
        ids = [cid for service in ("server", "client") for cid in self.containers(service)]
        codes = run(["docker", "wait", *ids], timeout=timeout).stdout.split()
        return dict(zip(ids, map(int, codes), strict=True))

    def logs(self, container: str) -> str:
        got = run(["docker", "logs", container], timeout=60)
        return got.stdout + got.stderr

    def copy_out(self, container: str, path: str) -> dict[str, bytes]:
        """The files under ``path`` in a container (running or stopped): name -> bytes."""
        tar = run_bytes(["docker", "cp", f"{container}:{path}", "-"])
        files = {}
        with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
            for member in archive.getmembers():
                handle = archive.extractfile(member)
                if handle is not None:
                    files[Path(member.name).name] = handle.read()
        return files

    def down(self) -> None:
        for follower in self.followers:
            follower.kill()
        self.cli("down", "-v", "--remove-orphans", "--timeout", "5", timeout=300, check=False)

    def __enter__(self) -> Project:
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()


def run_bytes(argv: Sequence[str], timeout: float = 120) -> bytes:
    done = subprocess.run(list(argv), capture_output=True, timeout=timeout)
    if done.returncode != 0:
        raise AssertionError(f"`{' '.join(argv)}` exited {done.returncode}: {done.stderr!r}")
    return done.stdout


def metrics(files: dict[str, bytes]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in files["metrics.jsonl"].decode().splitlines()]


def windows(record: dict[str, Any]) -> Iterator[tuple[float, float]]:
    for client in record["clients"]:
        yield client["train_started_unix_s"], client["train_finished_unix_s"]
