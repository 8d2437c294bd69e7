"""Process-wide logging: one format for every fedstream process."""

from __future__ import annotations

import logging


def setup_logging(level: str, role: str) -> None:
    logging.basicConfig(
        level=level,
        format=f"%(asctime)s %(levelname)-7s {role} %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # grpc's own chatter is not about rounds or clients.
    logging.getLogger("grpc").setLevel(logging.WARNING)
