"""Running federations from Python: ``run_local``, ``serve`` and ``run_client``.

``run_local`` starts real processes (``fl-local``: one server, K clients) and returns the
run's :class:`~fedstream.common.records.History`; ``serve`` and ``run_client`` run one
participant in the calling process (an asyncio event loop of their own) with settings
given as keyword arguments, the same names as the flags (``round_timeout_s=60``).
Failures raise :class:`RunFailed` with the exit status and what went wrong.
"""

from __future__ import annotations

import collections
import inspect
import logging
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedstream.common.errors import ConfigError, FedstreamError
from fedstream.common.records import History

TAIL_LINES = 20


class RunFailed(FedstreamError):  # type: ignore[misc]
    """A federation, server or client ended with a non-zero exit status."""

    def __init__(self, message: str, exit_status: int, output: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.exit_status = exit_status
        self.output = list(output)


def task_name(task: object) -> tuple[str, str | None]:
    """(import path, folder to add to PYTHONPATH) of a task given by name, class,
    instance or module. Client processes import it by that path, so it must be a
    module they can import: a class defined in a notebook cell cannot be."""
    if isinstance(task, str):
        return task, None
    target = task if inspect.isclass(task) or inspect.ismodule(task) else type(task)
    module = sys.modules.get(target.__module__ if not inspect.ismodule(target)
                             else target.__name__)
    if module is None:
        raise ConfigError(f"cannot tell which module defines {task!r}")
    folder = None
    name = module.__name__
    if name == "__main__":
        path = getattr(module, "__file__", None)
        if path is None:
            raise ConfigError(
                "a task defined in a notebook or an interactive session cannot be imported "
                "by client processes: put it in a module and pass 'module:Class'"
            )
        folder, name = str(Path(path).resolve().parent), Path(path).stem
    if inspect.ismodule(target):
        return name, folder
    if not inspect.isclass(task):
        raise ConfigError(
            "pass the task's class or 'module:Class', not an instance: client processes "
            "build their own (use task_options for its arguments)"
        )
    return f"{name}:{target.__qualname__}", folder


def run_local(
    task: object = "classification",
    rounds: int = 10,
    clients: int = 4,
    out: str | Path = "runs/latest",
    task_options: Mapping[str, object] | None = None,
    server_args: Sequence[str] = (),
    resume: bool = False,
    verbose: bool = False,
    timeout_s: float | None = None,
) -> History:
    """Run a local federation of ``clients`` client processes for ``rounds`` rounds and
    return its History. ``server_args`` are extra fl-server flags (``["--evaluate-every",
    "2"]``); the task and its options go to the server and every client."""
    name, folder = task_name(task)
    argv = [sys.executable, "-m", "fedstream.server.launcher", "--clients", str(clients),
            "--rounds", str(rounds), "--out", str(out), "--task", name]
    if resume:
        argv.append("--resume")
    if verbose:
        argv.append("--verbose")
    for key, value in (task_options or {}).items():
        argv += ["--task-opt", f"{key}={str(value).lower() if isinstance(value, bool) else value}"]
    if server_args:
        argv += ["--", *server_args]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if folder is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [folder, env.get("PYTHONPATH")]))
    log = logging.getLogger("fedstream.run_local")
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                          text=True, start_new_session=True) as process:
        assert process.stdout is not None
        try:
            for line in process.stdout:
                tail.append(line.rstrip("\n"))
                if verbose or " round " in line or "final" in line or "ERROR" in line:
                    log.info("%s", line.rstrip("\n"))
            code = process.wait(timeout=timeout_s)
        except BaseException:
            process.terminate()
            raise
    if code != 0:
        raise RunFailed(f"local federation exited with status {code}; last lines:\n"
                        + "\n".join(tail), code, list(tail))
    return History.read(Path(out))


def _setup_logging(level: str, role: str) -> None:
    # From a script or a notebook: log like the CLI does, unless the caller set up
    # logging already.
    if not logging.getLogger().handlers:
        from fedstream.common.logs import setup_logging

        setup_logging(level, role)


def serve(**settings: Any) -> History:
    """Run an aggregation server in this process until its last round; returns the run's
    History. Keyword arguments are ``fl-server``'s settings (``rounds=5, port=50051``)."""
    import asyncio

    from fedstream.server.main import serve as serve_async
    from fedstream.server.settings import ServerSettings

    parsed = ServerSettings(**settings)
    _setup_logging(parsed.log_level, "server")
    code = asyncio.run(serve_async(parsed))
    if code != 0:
        raise RunFailed(f"server exited with status {code}", code)
    return History.read(parsed.out)


def run_client(**settings: Any) -> None:
    """Run one client in this process until the server finishes the run. Keyword
    arguments are ``fl-client``'s settings (``server="host:50051", task=...``)."""
    import asyncio

    from fedstream.client.main import run_client as run_client_async
    from fedstream.client.settings import ClientSettings

    parsed = ClientSettings(**settings)
    _setup_logging(parsed.log_level, f"client[{parsed.client_id or os.getpid()}]")
    code = asyncio.run(run_client_async(parsed))
    if code != 0:
        raise RunFailed(f"client exited with status {code}", code)
