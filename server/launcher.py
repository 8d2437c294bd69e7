"""``fl-local``: a whole federation on this machine, one OS process per participant.

Starts one ``fl-server`` and K ``fl-client`` processes (fresh interpreters, never forked
after torch or gRPC start), gives client i GPU ``i mod #GPUs`` when GPUs exist, else an
equal share of the CPU cores, prefixes every output line with the process's role, and
on Ctrl-C or SIGTERM stops them all: SIGTERM to each process group, SIGKILL after a grace
period. It supervises them all at once: when the server exits, the clients get a moment
to take their Finish and are then stopped; when every client has exited, the server is
stopped (or, if they all finished cleanly, given a moment to finish too). It then names
each process that failed, with its exit status and the last lines of its output. Exits
with the server's exit status, or 1 if a client failed or the clients all left early.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import IO

GRACE_S = 10.0
TAIL_LINES = 10  # lines of a failed process's output repeated in the report


@dataclass
class Child:
    role: str
    process: subprocess.Popen[bytes]
    pump: threading.Thread
    tail: collections.deque[str] = field(
        default_factory=lambda: collections.deque(maxlen=TAIL_LINES)
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _pump(
    role: str,
    stream: IO[bytes],
    lock: threading.Lock,
    tail: collections.deque[str],
    process: subprocess.Popen[bytes],
    exited: queue.Queue[str],
) -> None:
    """Relay one child's output with its role prefix, then report its exit."""
    prefix = f"[{role}] ".encode()
    for line in iter(stream.readline, b""):
        tail.append(line.decode(errors="replace").rstrip("\n"))
        with lock:
            sys.stdout.buffer.write(prefix + line)
            sys.stdout.buffer.flush()
    stream.close()
    process.wait()
    exited.put(role)


def _spawn(
    role: str,
    argv: list[str],
    lock: threading.Lock,
    env: dict[str, str],
    exited: queue.Queue[str],
) -> Child:
    process = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # own process group: Ctrl-C is relayed once, by us
        env=env,
    )
    assert process.stdout is not None
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    pump = threading.Thread(
        target=_pump, args=(role, process.stdout, lock, tail, process, exited), daemon=True
    )
    pump.start()
    return Child(role, process, pump, tail)


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:  # pragma: no cover - torch is a dependency
        return 0


def client_placement(num_clients: int, num_gpus: int, cores: int) -> list[list[str]]:
    """Per-client device flags: round-robin over GPUs, else the cores divided evenly."""
    if num_gpus:
        return [["--gpu", str(i % num_gpus)] for i in range(num_clients)]
    share = max(1, cores // num_clients)
    return [["--num-threads", str(share)] for _ in range(num_clients)]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fl-local",
        description="Run a local federation: one fl-server and K fl-client processes. "
        "Flags after '--' go to fl-server unchanged.",
    )
    parser.add_argument("--clients", type=int, default=4, help="number of client processes")
    parser.add_argument("--rounds", type=int, default=10, help="federated rounds")
    parser.add_argument("--port", type=int, default=0, help="server port (0 = a free port)")
    parser.add_argument("--out", default="runs/latest", help="checkpoint and metrics folder")
    parser.add_argument("--cpu", action="store_true", help="ignore GPUs even if present")
    parser.add_argument(
        "--resume", action="store_true", help="continue from the checkpoint in --out"
    )
    parser.add_argument(
        "--verbose", action="store_true", help="show every client's log, not only warnings"
    )
    # What the federation trains goes to the server and every client alike: a client
    # runs only the task (and imports only the code) its own flags name.
    parser.add_argument("--task", help="task for server and clients (default: classification)")
    parser.add_argument(
        "--task-opt", action="append", default=[], metavar="KEY=VALUE",
        help="task option for server and clients; repeatable",
    )
    parser.add_argument("--model", help="model of the built-in task, for server and clients")
    parser.add_argument("--dataset", help="dataset of the built-in task, for server and clients")
    parser.add_argument("--data-dir", help="folder holding the datasets, for server and clients")
    parser.add_argument("server_args", nargs=argparse.REMAINDER, help="extra fl-server flags")
    return parser


def task_flags(args: argparse.Namespace) -> list[str]:
    """The flags naming what is trained, passed to the server and to every client."""
    flags = []
    for name in ("task", "model", "dataset", "data_dir"):
        value = getattr(args, name)
        if value:
            flags += [f"--{name.replace('_', '-')}", value]
    for option in args.task_opt:
        flags += ["--task-opt", option]
    return flags


def _wait_until_exited(
    children: Sequence[Child], exited: queue.Queue[str], timeout_s: float
) -> None:
    """Wait up to ``timeout_s`` for every one of ``children`` to exit by itself."""
    deadline = time.monotonic() + timeout_s
    while any(c.process.poll() is None for c in children):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        with contextlib.suppress(queue.Empty):
            exited.get(timeout=remaining)


def supervise(children: Sequence[Child], exited: queue.Queue[str]) -> set[str]:
    """Return when the server has exited or every client has, then stop the rest.

    A clean end (the server says the run is complete) lets the others exit by
    themselves within the grace period; anything else stops them at once. Returns the
    roles of the processes that had to be stopped.
    """
    server, clients = children[0], children[1:]
    while True:
        exited.get()
        if server.process.poll() is not None:
            if server.process.returncode == 0:
                _wait_until_exited(clients, exited, GRACE_S)
            break
        if all(c.process.poll() is not None for c in clients):
            if all(c.process.returncode == 0 for c in clients):
                _wait_until_exited([server], exited, GRACE_S * 3)
            break
    return stop_all(children)


def report(children: Sequence[Child], stopped: set[str]) -> list[str]:
    """One paragraph per process that failed: role, exit status, last lines."""
    lines = []
    for child in children:
        code = child.process.returncode
        if code == 0:
            continue
        if child.role in stopped:
            lines.append(f"fl-local: {child.role} was still running; stopped")
            continue
        what = f"killed by signal {-code}" if code < 0 else f"exited with status {code}"
        lines.append(f"fl-local: {child.role} {what}; its last lines:")
        lines.extend(f"    {line}" for line in child.tail)
    return lines


def stop_all(children: Sequence[Child]) -> set[str]:
    """SIGTERM every running child's process group, SIGKILL after GRACE_S; who was hit."""
    stopped = set()
    for child in children:
        if child.process.poll() is None:
            stopped.add(child.role)
            os.killpg(child.process.pid, signal.SIGTERM)
    for child in children:
        try:
            child.process.wait(timeout=GRACE_S)
        except subprocess.TimeoutExpired:
            os.killpg(child.process.pid, signal.SIGKILL)
            child.process.wait()
    return stopped


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.clients < 1:
        print("fl-local: --clients must be at least 1", file=sys.stderr)
        return 2
    port = args.port or free_port()
    shared = task_flags(args)
    extra = [*shared, *(a for a in args.server_args if a != "--")]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    lock = threading.Lock()
    server_argv = [
        sys.executable, "-m", "fedstream.server",
        "--host", "127.0.0.1", "--port", str(port),
        "--rounds", str(args.rounds), "--min-clients", str(args.clients),
        "--out", args.out, "--resume" if args.resume else "--no-resume", *extra,
    ]  # fmt: skip
    gpus = 0 if args.cpu else _gpu_count()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    placement = client_placement(args.clients, gpus, cores or 1)
    exited: queue.Queue[str] = queue.Queue()
    children = [_spawn("server", server_argv, lock, env, exited)]
    interrupted = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal interrupted
        interrupted = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        for i, device_flags in enumerate(placement):
            client_argv = [
                sys.executable, "-m", "fedstream.client",
                "--server", f"127.0.0.1:{port}", "--client-id", f"client-{i}",
                "--partition-index", str(i), *device_flags,
                "--log-level", "INFO" if args.verbose else "WARNING", *shared,
            ]  # fmt: skip
            children.append(_spawn(f"client-{i}", client_argv, lock, env, exited))
        stopped = supervise(children, exited)
    except KeyboardInterrupt:
        print("fl-local: stopping all processes", file=sys.stderr)
        stop_all(children)
        return 130
    finally:
        stop_all(children)
        for child in children:
            child.pump.join(timeout=2)
    return outcome(children, stopped)


def outcome(children: Sequence[Child], stopped: set[str]) -> int:
    """Print who failed and why; the server's status, else 1 if anyone failed, else 0."""
    for line in report(children, stopped):
        print(line, file=sys.stderr)
    server, clients = children[0], children[1:]
    if "server" in stopped:
        print("fl-local: every client exited before the run ended", file=sys.stderr)
        return 1
    if server.process.returncode != 0:
        return server.process.returncode
    failed = [c.role for c in clients if c.process.returncode != 0]
    if failed:
        print(f"fl-local: clients exited with errors: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
