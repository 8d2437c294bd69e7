"""Shared fixtures: a process cluster that is always torn down, and a container engine."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests.docker import composefile, engine
from tests.procs import Cluster


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    logs = tmp_path / "logs"
    logs.mkdir()
    procs = Cluster(logs)
    try:
        yield procs
    finally:
        procs.close()


# --- a real container engine (tests marked `cluster`, run by `make test-cluster`) ----------


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[None]:
    with ExitStack() as stack:
        try:
            stack.enter_context(engine.docker_engine())
        except engine.Unavailable as why:
            pytest.skip(f"no Docker engine: {why}")
        yield


@pytest.fixture(scope="session")
def compose_cli(docker_engine: None) -> list[str]:
    try:
        return engine.compose_cli()
    except engine.Unavailable as why:
        pytest.skip(str(why))


@pytest.fixture(scope="session")
def cluster_image(compose_cli: list[str]) -> str:
    """docker/Dockerfile built once per session (and cached by the engine across runs)."""
    return engine.build_test_image(compose_cli, composefile.CPU_FILE)
