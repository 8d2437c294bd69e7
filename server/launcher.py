"""``fl-local``: a whole federation on this machine, one OS process per participant.

Starts one ``fl-server`` and K ``fl-client`` processes (fresh interpreters, never forked
after torch or gRPC start), gives client i GPU ``i mod #GPUs`` when GPUs exist, else an
equal share of the CPU cores, prefixes every output line with the process's role, and
on Ctrl-C or SIGTERM stops them all: SIGTERM to each process group, SIGKILL after a grace
period. Exits with the server's exit status (or 1 if a client failed).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO

GRACE_S = 10.0


@dataclass
class Child:
    role: str
    process: subprocess.Popen[bytes]
    pump: threading.Thread


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _pump(role: str, stream: IO[bytes], lock: threading.Lock) -> None:
    prefix = f"[{role}] ".encode()
    for line in iter(stream.readline, b""):
        with lock:
            sys.stdout.buffer.write(prefix + line)
            sys.stdout.buffer.flush()
    stream.close()


def _spawn(role: str, argv: list[str], lock: threading.Lock, env: dict[str, str]) -> Child:
    process = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # own process group: Ctrl-C is relayed once, by us
        env=env,
    )
    assert process.stdout is not None
    pump = threading.Thread(target=_pump, args=(role, process.stdout, lock), daemon=True)
    pump.start()
    return Child(role, process, pump)


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
    parser.add_argument("server_args", nargs=argparse.REMAINDER, help="extra fl-server flags")
    return parser


def stop_all(children: Sequence[Child]) -> None:
    for child in children:
        if child.process.poll() is None:
            os.killpg(child.process.pid, signal.SIGTERM)
    for child in children:
        try:
            child.process.wait(timeout=GRACE_S)
        except subprocess.TimeoutExpired:
            os.killpg(child.process.pid, signal.SIGKILL)
            child.process.wait()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.clients < 1:
        print("fl-local: --clients must be at least 1", file=sys.stderr)
        return 2
    port = args.port or free_port()
    extra = [a for a in args.server_args if a != "--"]
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
    children = [_spawn("server", server_argv, lock, env)]
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
                "--log-level", "INFO" if args.verbose else "WARNING",
            ]  # fmt: skip
            children.append(_spawn(f"client-{i}", client_argv, lock, env))
        server_code = children[0].process.wait()
        client_codes = []
        for child in children[1:]:
            try:
                client_codes.append(child.process.wait(timeout=GRACE_S * 3))
            except subprocess.TimeoutExpired:
                client_codes.append(-1)
    except KeyboardInterrupt:
        print("fl-local: stopping all processes", file=sys.stderr)
        stop_all(children)
        return 130
    finally:
        stop_all(children)
        for child in children:
            child.pump.join(timeout=2)
    if server_code != 0:
        return server_code
    failed = [c.role for c, code in zip(children[1:], client_codes, strict=True) if code != 0]
    if failed:
        print(f"fl-local: clients exited with errors: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
