"""Child processes of a benchmark: the real ``fl-server``, real clients and workers.

Every child runs in its own process group and is killed with its group when the
benchmark ends, whatever happened. A child is waited on by the lines it prints (the
server's "listening on" log line, a worker's JSON event), never by sleeping. The server's
memory is read from ``/proc/<pid>/status``: ``VmHWM`` is the kernel's own record of the
peak resident set, so no short spike between two samples can be missed.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

REPO_ROOT = Path(__file__).resolve().parent.parent


class BenchError(RuntimeError):
    """A benchmark could not produce its figure (a child failed or went silent)."""


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of every child: the repository importable, output unbuffered."""
    path = os.environ.get("PYTHONPATH", "")
    return {
        **os.environ,
        "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{path}" if path else str(REPO_ROOT),
        "PYTHONUNBUFFERED": "1",
        **(extra or {}),
    }


class Child:
    """One child process; its stdout lines are queued, its stderr goes to a log file."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_dir: Path,
        env: dict[str, str] | None = None,
        merge_stderr: bool = False,
    ) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = self.log_path.open("a")
        self.process = subprocess.Popen(
            list(argv),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT if merge_stderr else self._log,
            start_new_session=True,
            env=child_env(env),
            text=True,
            cwd=REPO_ROOT,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        stream: IO[str] | None = self.process.stdout
        if stream is not None:
            for line in stream:
                self._log.write(line)
                self._log.flush()
                self._lines.put(line.rstrip("\n"))
        self._lines.put(None)

    def line(self, timeout_s: float) -> str:
        """The next stdout line; BenchError when the child exits or stays silent."""
        try:
            line = self._lines.get(timeout=timeout_s)
        except queue.Empty:
            raise BenchError(f"{self.name}: silent for {timeout_s:g}s; {self.tail()}") from None
        if line is None:
            self._lines.put(None)
            self.process.wait()
            raise BenchError(
                f"{self.name} exited with {self.process.returncode}; {self.tail()}"
            )
        return line

    def event(self, kind: str, timeout_s: float) -> dict[str, Any]:
        """The next JSON event of ``kind`` a worker printed (other lines are skipped)."""
        deadline = time.monotonic() + timeout_s
        while True:
            line = self.line(max(0.01, deadline - time.monotonic()))
            if line.startswith("{"):
                record: dict[str, Any] = json.loads(line)
                if record.get("event") == kind:
                    return record

    def send(self, text: str) -> None:
        if self.process.stdin is None:
            raise BenchError(f"{self.name}: no stdin")
        self.process.stdin.write(text + "\n")
        self.process.stdin.flush()

    def wait(self, timeout_s: float) -> int:
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise BenchError(f"{self.name} still running after {timeout_s:g}s") from None

    def tail(self, lines: int = 15) -> str:
        self._log.flush()
        try:
            text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return "(no log)"
        return f"last log lines of {self.log_path}:\n" + "\n".join(text)

    def kill(self) -> None:
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait()
        self._reader.join(timeout=5)
        self._log.close()


class Children:
    """Every child of one benchmark case; ``close`` kills them all."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.all: list[Child] = []

    def start(
        self,
        name: str,
        argv: Sequence[str],
        env: dict[str, str] | None = None,
        merge_stderr: bool = False,
    ) -> Child:
        child = Child(name, argv, self.log_dir, env, merge_stderr)
        self.all.append(child)
        return child

    def close(self) -> None:
        for child in self.all:
            child.kill()


@contextmanager
def children(log_dir: Path) -> Iterator[Children]:
    log_dir.mkdir(parents=True, exist_ok=True)
    group = Children(log_dir)
    try:
        yield group
    finally:
        group.close()


# ---- the real fl-server --------------------------------------------------------------

_LISTENING = re.compile(r"listening on .*:(\d+) \(model")
_ROUND_DONE = re.compile(r"round (\d+)/(\d+)\s+clients")


class MemoryProbe:
    """Samples a process's resident set (VmRSS) and peak (VmHWM) in a thread at ~20 Hz."""

    def __init__(self, pid: int, period_s: float = 0.05) -> None:
        self.pid = pid
        self.period_s = period_s
        self.peak_bytes = 0
        self.last_rss_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def read(self) -> tuple[int, int]:
        """(VmRSS, VmHWM) in bytes; (0, 0) once the process is gone."""
        try:
            text = Path(f"/proc/{self.pid}/status").read_text()
        except OSError:
            return 0, 0
        fields = dict(
            (line.split(":")[0], int(line.split()[1]) * 1024)
            for line in text.splitlines()
            if line.startswith(("VmRSS:", "VmHWM:"))
        )
        return fields.get("VmRSS", 0), fields.get("VmHWM", 0)

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            rss, hwm = self.read()
            if hwm:
                self.last_rss_bytes = rss
                self.peak_bytes = max(self.peak_bytes, hwm)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


class Server:
    """A real ``fl-server`` process started on a free loopback port."""

    def __init__(self, group: Children, flags: Sequence[str], env: dict[str, str], out: Path,
                 name: str = "server", start_timeout_s: float = 120.0) -> None:
        self.out = out
        argv = [sys.executable, "-m", "fedstream.server", "--host", "127.0.0.1", "--port", "0",
                "--out", str(out), *flags]
        # The server logs to stderr; it is merged into stdout so its lines can be awaited.
        self.child = group.start(name, argv, env, merge_stderr=True)
        self.port = int(self.wait_for(_LISTENING, start_timeout_s).group(1))
        self.address = f"127.0.0.1:{self.port}"
        self.memory = MemoryProbe(self.child.process.pid)
        self.idle_rss_bytes = self.memory.read()[0]

    def wait_for(self, pattern: re.Pattern[str], timeout_s: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout_s
        while True:
            line = self.child.line(max(0.01, deadline - time.monotonic()))
            match = pattern.search(line)
            if match:
                return match

    def wait_rounds(self, rounds: int, timeout_s: float) -> None:
        """Block until the server logs the end of round ``rounds``."""
        deadline = time.monotonic() + timeout_s
        while True:
            match = self.wait_for(_ROUND_DONE, max(0.01, deadline - time.monotonic()))
            if int(match.group(1)) >= rounds:
                return

    def finish(self, timeout_s: float) -> list[dict[str, Any]]:
        """Wait for a clean exit; the per-round records of ``metrics.jsonl``."""
        code = self.child.wait(timeout_s)
        self.memory.stop()
        if code != 0:
            raise BenchError(f"fl-server exited with {code}; {self.child.tail()}")
        path = self.out / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def server_env(model_bytes: int, tensor_bytes: int | None = None) -> dict[str, str]:
    """Environment naming the synthetic model's size (read by benchmarks.models)."""
    env = {"FEDSTREAM_BENCH_MODEL_BYTES": str(model_bytes)}
    if tensor_bytes is not None:
        env["FEDSTREAM_BENCH_TENSOR_BYTES"] = str(tensor_bytes)
    return env


def synthetic_server_flags(clients: int, rounds: int) -> list[str]:
    """fl-server flags for a transport run: synthetic model, no evaluation."""
    return [
        "--model", "benchmarks.models:synthetic",
        "--dataset", "digits",
        "--no-evaluate", "--evaluate-every", "0",
        "--min-clients", str(clients),
        "--rounds", str(rounds),
        "--round-timeout", "900",
        "--join-timeout", "300",
        "--round-retries", "0",
        "--log-level", "INFO",
    ]
