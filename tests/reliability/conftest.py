"""Fixtures of the reliability tests: the in-process server harness of the integration
tests, shared rather than copied, so fuzzing drives exactly the server they test."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from tests.integration.conftest import Harness, make_harness

# What a test receives from the make_harness fixture: build a server with config overrides.
MakeHarness = Callable[..., Awaitable[Harness]]

__all__ = ["MakeHarness", "make_harness"]
