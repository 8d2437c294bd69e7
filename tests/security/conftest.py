"""The in-process server harness of the integration tests, shared rather than copied."""

from __future__ import annotations

from tests.integration.conftest import make_harness

__all__ = ["make_harness"]
