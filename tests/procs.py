"""Real fl-server / fl-client processes for end-to-end tests.

Each process runs in its own process group (so teardown kills it and anything it
started), its combined output is read line by line by a thread, kept in memory and
written to a log file, and tests wait for a log line, never for a fixed time.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from fedstream.server.launcher import free_port


class Proc:
    """One child process whose output lines can be awaited."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_dir: Path,
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self.log_path = log_dir / f"{name}.log"
        full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.process = subprocess.Popen(
            self.argv,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=full_env,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        with self.log_path.open("w") as log:
            for line in self.process.stdout:
                log.write(line)
                log.flush()
                with self._changed:
                    self.lines.append(line.rstrip("\n"))
                    self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_for(self, pattern: str, timeout: float = 60.0, start: int = 0) -> re.Match[str]:
        """Block until an output line (from index ``start`` on) matches ``pattern``."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = start
        with self._changed:
            while True:
                for line in self.lines[seen:]:
                    match = regex.search(line)
                    if match:
                        return match
                seen = len(self.lines)
                if not self._reader.is_alive():
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._changed.wait(remaining)
        raise AssertionError(
            f"{self.name}: no line matching {pattern!r} within {timeout}s; last lines:\n"
            + "\n".join(self.lines[-30:])
        )

    def output(self) -> str:
        with self._changed:
            return "\n".join(self.lines)

    def wait(self, timeout: float = 120.0) -> int:
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(
                f"{self.name} still running after {timeout}s; last lines:\n"
                + "\n".join(self.lines[-30:])
            ) from exc
        self._reader.join(timeout=5)
        return code

    def signal(self, signum: int) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signum)

    def kill(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()
        self._reader.join(timeout=5)


def server_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedstream.server", *args]


def client_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedstream.client", *args]


class Cluster:
    """Starts processes and kills every one of them at teardown."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[Proc] = []

    def start(self, name: str, argv: Sequence[str], env: dict[str, str] | None = None) -> Proc:
        # Client state (credential files) stays inside the test, never in the home folder.
        env = {"XDG_STATE_HOME": str(self.log_dir.parent / "state"), **(env or {})}
        proc = Proc(name, argv, self.log_dir, env)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            proc.kill()


LISTENING = r"listening on .*:(\d+)"


def start_fl_server(
    cluster: Cluster, out: Path, *flags: str, port: int | None = None, name: str = "server"
) -> tuple[Proc, int]:
    """Start fl-server on loopback and return once it listens."""
    port = port or free_port()
    server = cluster.start(
        name,
        server_argv("--host", "127.0.0.1", "--port", str(port), "--out", str(out), *flags),
    )
    server.wait_for(LISTENING, timeout=120)
    return server, port


def read_metrics(out: Path) -> list[dict[str, object]]:
    with (out / "metrics.jsonl").open() as handle:
        return [json.loads(line) for line in handle]
