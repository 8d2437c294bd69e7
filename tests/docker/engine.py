"""A real Docker engine for the cluster tests, made from what this machine has.

Nothing can be pulled from a container registry here, so every image is built locally:

- packages: ``docker.io``, ``docker-compose`` and ``debootstrap`` are installed with
  apt-get when missing (root only);
- the daemon: when no engine answers, ``dockerd`` is started and stopped again afterwards;
- the base image: Debian bookworm (``python3`` 3.11) by ``debootstrap --variant=minbase``
  from the mirror apt already uses, then ``docker import``-ed; built once per machine;
- the wheels image: ``pip download`` of the project's dependencies with the host's own pip
  configuration (its local wheel folders and indexes), in a ``FROM scratch`` image that
  docker/Dockerfile takes as ``WHEELS_IMAGE``; tagged by a hash of what it was made from,
  so it too is built once;
- the fedstream image: built by the compose CLI from docker/docker-compose.yml with
  those two images as build arguments, offline (``PIP_NO_INDEX=1``).

Every step says what it runs and why it failed. Images are left in place for the next
run (that is the cache); containers, networks and volumes belong to the tests that make
them.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BASE_IMAGE = "fedstream-base:bookworm"
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates", "passwd")
# Kept apart from the tag users build (fedstream:cpu), so a test never replaces theirs.
TEST_IMAGE = "fedstream-test:cpu"
STATE_DIR = Path(os.environ.get("FEDSTREAM_TEST_STATE", "/var/tmp/fedstream-tests"))
SOCKET = Path("/var/run/docker.sock")


class Unavailable(Exception):
    """The engine cannot run on this machine (the tests skip, giving this reason)."""


@dataclass(frozen=True)
class Ran:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str


def run(
    argv: Sequence[str],
    *,
    timeout: float,
    check: bool = True,
    env: dict[str, str] | None = None,
    input_text: str | None = None,
    cwd: Path | None = None,
) -> Ran:
    """Run a command; on failure raise with its command line and the end of its output."""
    try:
        done = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, input=input_text,
            env={**os.environ, **(env or {})}, cwd=cwd,
        )
    except subprocess.TimeoutExpired as error:
        raise AssertionError(f"`{' '.join(argv)}` still running after {timeout:.0f}s") from error
    result = Ran(list(argv), done.returncode, done.stdout, done.stderr)
    if check and done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-40:])
        raise AssertionError(f"`{' '.join(argv)}` exited {done.returncode}:\n{tail}")
    return result


# --- packages --------------------------------------------------------------------------


def ensure_packages(commands: dict[str, str]) -> None:
    """Install the Debian package of each missing command (``{command: package}``)."""
    missing = sorted({pkg for cmd, pkg in commands.items() if shutil.which(cmd) is None})
    if not missing:
        return
    if os.geteuid() != 0:
        raise Unavailable(f"needs root to install {', '.join(missing)}")
    if shutil.which("apt-get") is None:
        raise Unavailable(f"{', '.join(missing)} missing and there is no apt-get")
    env = {"DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing]
    if run(install, timeout=900, check=False, env=env).returncode != 0:
        # A fresh machine has no package lists yet.
        run(["apt-get", "update", "-q"], timeout=600, env=env)
        run(install, timeout=900, env=env)
    still = [cmd for cmd in commands if shutil.which(cmd) is None]
    if still:
        raise Unavailable(f"installed {', '.join(missing)} but {', '.join(still)} not found")


# --- the daemon ------------------------------------------------------------------------


def engine_answers() -> bool:
    return run(["docker", "info", "--format", "{{.ServerVersion}}"], timeout=30,
               check=False).returncode == 0


@contextmanager
def docker_engine() -> Iterator[None]:
    """A Docker engine that answers: the one running, or a dockerd started for the tests
    (and stopped at the end; its images stay in its data root for the next run)."""
    if os.geteuid() != 0:
        raise Unavailable("needs root (to start dockerd and to make images)")
    ensure_packages({"docker": "docker.io", "dockerd": "docker.io",
                     "docker-compose": "docker-compose", "debootstrap": "debootstrap"})
    if engine_answers():
        yield
        return
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    log_path = STATE_DIR / "dockerd.log"
    with log_path.open("ab") as log:
        daemon = subprocess.Popen(
            ["dockerd", "--pidfile", str(STATE_DIR / "dockerd.pid")],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 90
        while not engine_answers():
            if daemon.poll() is not None:
                raise Unavailable(
                    f"dockerd exited {daemon.returncode}; last lines of {log_path}:\n"
                    + "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
                )
            if time.monotonic() > deadline:
                raise Unavailable(f"dockerd did not answer within 90 s (see {log_path})")
            time.sleep(0.5)  # the daemon offers nothing to wait on before its socket exists
        yield
    finally:
        if daemon.poll() is None:
            os.killpg(daemon.pid, signal.SIGTERM)
            try:
                daemon.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(daemon.pid, signal.SIGKILL)
                daemon.wait()


def image_exists(tag: str) -> bool:
    return run(["docker", "image", "inspect", tag], timeout=60, check=False).returncode == 0


def image_size_bytes(tag: str) -> int:
    return int(run(["docker", "image", "inspect", "--format", "{{.Size}}", tag],
                   timeout=60).stdout.strip())


# --- the base image --------------------------------------------------------------------


def apt_mirror(etc_apt: Path = Path("/etc/apt")) -> str:
    """The Debian mirror apt uses for bookworm's main component (deb822 or one-line form)."""
    files = sorted((etc_apt / "sources.list.d").glob("*")) + [etc_apt / "sources.list"]
    for path in files:
        if not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        if path.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields: dict[str, str] = {
                    k.strip().lower(): v.strip()
                    for k, _, v in (line.partition(":") for line in stanza.splitlines())
                    if not k.startswith("#") and v
                }
                suites = fields.get("suites", "").split()
                if "bookworm" in suites and "main" in fields.get("components", "").split():
                    return fields["uris"].split()[0]
        else:
            for line in text.splitlines():
                words = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
                if len(words) >= 4 and words[0] == "deb" and words[2] == "bookworm":
                    if "main" in words[3:]:
                        return words[1]
    raise Unavailable(f"no bookworm main entry in apt's sources under {etc_apt}")


def ensure_base_image(tag: str = BASE_IMAGE) -> str:
    """Debian bookworm with python3, made by debootstrap and imported, once per machine."""
    if image_exists(tag):
        return tag
    mirror = apt_mirror()
    with tempfile.TemporaryDirectory(prefix="fedstream-rootfs-") as tmp:
        root = Path(tmp) / "rootfs"
        run(["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}",
             "bookworm", str(root), mirror], timeout=1200)
        # What apt fetched is not part of an image.
        for leftover in (root / "var/cache/apt/archives").glob("*.deb"):
            leftover.unlink()
        shutil.rmtree(root / "var/lib/apt/lists", ignore_errors=True)
        tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
        try:
            imported = subprocess.run(
                ["docker", "import", "-c", "ENV LANG=C.UTF-8", "-c", 'CMD ["/bin/bash"]',
                 "-", tag], stdin=tar.stdout, capture_output=True, text=True, timeout=600,
            )
        finally:
            assert tar.stdout is not None
            tar.stdout.close()
            tar.wait()
        if imported.returncode != 0:
            raise AssertionError(f"docker import {tag} failed: {imported.stderr}")
    return tag


# --- the wheels image ------------------------------------------------------------------


def requirements() -> list[str]:
    """What pip installs in the image: the project's dependencies and its build backend."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    return [*pyproject["project"]["dependencies"], *pyproject["build-system"]["requires"]]


def ensure_wheels_image() -> str:
    """The project's requirements as wheels in /wheels of a ``FROM scratch`` image.

    pip resolves them with the host's own configuration (``pip config list``: its local
    find-links folders, indexes and CA bundle), so the host decides where torch comes from
    and no address of it appears in the project. The tag hashes the requirements and that
    configuration: a change to either makes a new image.
    """
    pip = [sys.executable, "-m", "pip"]
    config = run([*pip, "config", "list"], timeout=60).stdout
    wanted = requirements()
    digest = hashlib.sha256("\n".join([*wanted, config]).encode()).hexdigest()[:16]
    tag = f"fedstream-wheels:{digest}"
    if image_exists(tag):
        return tag
    with tempfile.TemporaryDirectory(prefix="fedstream-wheels-") as tmp:
        folder = Path(tmp) / "wheels"
        # The base is Debian bookworm's Python 3.11, like the interpreter running this, so
        # the wheels pip picks here install there. --only-binary: the builder has no
        # compiler, so nothing may need one.
        run([*pip, "download", "--quiet", "--only-binary", ":all:", "--dest", str(folder),
             *wanted], timeout=1800)
        run(["docker", "build", "--quiet", "--tag", tag, "--file", "-", str(folder)],
            timeout=1800, input_text="FROM scratch\nCOPY . /wheels/\n")
    return tag


# --- compose ---------------------------------------------------------------------------


def compose_cli() -> list[str]:
    """The Compose CLI: FEDSTREAM_COMPOSE when set, else Debian's ``docker-compose`` (v1),
    else ``docker compose`` (v2). The compose files keep to what both accept."""
    chosen = os.environ.get("FEDSTREAM_COMPOSE")
    candidates = [chosen.split()] if chosen else [["docker-compose"], ["docker", "compose"]]
    for argv in candidates:
        if shutil.which(argv[0]) and run([*argv, "version"], timeout=60,
                                         check=False).returncode == 0:
            return argv
    raise Unavailable("no Compose CLI (docker-compose or `docker compose`) works here")


def build_test_image(compose: Sequence[str], compose_file: Path) -> str:
    """docker/Dockerfile built by the compose CLI, on the local base and wheels, offline."""
    base = ensure_base_image()
    wheels = ensure_wheels_image()
    run([*compose, "-p", "fedstream-build", "-f", str(compose_file), "build",
         "--build-arg", f"BASE_IMAGE={base}", "--build-arg", f"WHEELS_IMAGE={wheels}",
         "--build-arg", "PIP_NO_INDEX=1", "server"],
        timeout=2400, env={"FL_IMAGE": TEST_IMAGE})
    return TEST_IMAGE
