"""fedstream: federated learning with a streaming gRPC server and truly parallel clients.

The Python API::

    import fedstream

    history = fedstream.run_local("mypkg.mytask:MyTask", rounds=10, clients=4)
    print(history.last("accuracy"))

``run_local`` runs a real local federation (one server and K client processes, as
``fl-local`` does); ``serve`` and ``run_client`` run one server or one client in this
process, for users who place processes themselves. ``Task``, ``Context`` and
``Partition`` are what a task is written with (``fedstream.common.task``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fedstream.common.version import package_version

__version__ = package_version()
__all__ = [
    "Context", "History", "Partition", "RunFailed", "Task", "__version__", "run_client",
    "run_local", "serve",
]

if TYPE_CHECKING:
    from fedstream.common.records import History
    from fedstream.common.task import Context, Partition, Task
    from fedstream.runs import RunFailed, run_client, run_local, serve

_LAZY = {
    "Task": "fedstream.common.task",
    "Context": "fedstream.common.task",
    "Partition": "fedstream.common.task",
    "History": "fedstream.common.records",
    "RunFailed": "fedstream.runs",
    "run_local": "fedstream.runs",
    "serve": "fedstream.runs",
    "run_client": "fedstream.runs",
}


def __getattr__(name: str) -> Any:
    # Importing fedstream stays cheap (no torch, no grpc) until something is used.
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'fedstream' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module_name), name)
