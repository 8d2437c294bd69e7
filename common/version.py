"""fedstream's version, as installed, and the one-line answer to ``--version``."""

from __future__ import annotations

import platform
from importlib import metadata


def package_version() -> str:
    try:
        return metadata.version("fedstream")
    except metadata.PackageNotFoundError:  # running from a source tree that is not installed
        return "0+unknown"


def version_line(program: str) -> str:
    import torch
    from fedstream.common.messages import PROTOCOL_VERSION

    return (
        f"{program} {package_version()} (protocol {PROTOCOL_VERSION}, torch {torch.__version__}, "
        f"python {platform.python_version()})"
    )
