"""``fl-healthcheck``: ask a running fl-server whether it is serving, as a container probe.

A container engine judges a health check by the probe's exit status alone, so this asks
the standard gRPC health-checking service (grpc.health.v1, which every fl-server
registers for "" and "fedstream.v1.Federation") once, with a deadline, and maps the
answer to 0 (SERVING) or 1 (anything else: NOT_SERVING while the server shuts down,
SERVICE_UNKNOWN, no answer in time, nothing listening). Status 2 is reserved by the
engines, so it is never used.

The probe runs inside the server's own container with the server's environment, so it
reads the address from ``FL_SERVER_PORT`` and ``FL_SERVER_HOST`` when no flag is given:
changing the server's port in one place keeps the probe pointing at it.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence

import grpc
from fedstream.server.settings import ENV_PREFIX, ServerSettings
from grpc_health.v1 import health_pb2, health_pb2_grpc

HEALTHY = 0
UNHEALTHY = 1
# Addresses that mean "every interface": a probe dials loopback instead.
_WILDCARDS = {"", "[::]", "::", "0.0.0.0"}


def default_target(environ: Mapping[str, str]) -> tuple[str, int]:
    """(host, port) the server in this environment listens on, as seen from its own host."""
    defaults = ServerSettings.model_fields
    host = environ.get(f"{ENV_PREFIX}HOST", str(defaults["host"].default)).strip()
    port = environ.get(f"{ENV_PREFIX}PORT", str(defaults["port"].default)).strip()
    return ("localhost" if host in _WILDCARDS else host), int(port)


def build_parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    host, port = default_target(environ)
    parser = argparse.ArgumentParser(
        prog="fl-healthcheck",
        description="Exit 0 when the fl-server at HOST:PORT reports SERVING through the "
        "gRPC health-checking service, 1 otherwise.",
    )
    parser.add_argument("--host", default=host, help=f"server host (default: {host!r})")
    parser.add_argument("--port", type=int, default=port, help=f"server port (default: {port})")
    parser.add_argument(
        "--service",
        default="",
        help="service name to ask about ('' is the whole server; default: '')",
    )
    parser.add_argument(
        "--timeout", type=float, default=3.0, help="seconds to wait for an answer (default: 3)"
    )
    return parser


def check(host: str, port: int, service: str, timeout_s: float) -> tuple[int, str]:
    """(exit status, one line saying why) for one Check call."""
    target = f"{host}:{port}"
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(
                health_pb2.HealthCheckRequest(service=service),
                timeout=timeout_s,
            )
        except grpc.RpcError as error:
            code = error.code() if isinstance(error, grpc.Call) else None
            name = code.name if code is not None else type(error).__name__
            return UNHEALTHY, f"{target} service {service!r}: {name}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    healthy = reply.status == health_pb2.HealthCheckResponse.SERVING
    return (HEALTHY if healthy else UNHEALTHY), f"{target} service {service!r}: {status}"


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser(os.environ).parse_args(argv)
    except ValueError as error:  # FL_SERVER_PORT that is not a number
        print(f"fl-healthcheck: {error}", file=sys.stderr)
        return UNHEALTHY
    code, reason = check(args.host, args.port, args.service, args.timeout)
    print(reason, file=sys.stdout if code == HEALTHY else sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
