"""``fl-healthcheck``: ask a running fl-server whether it is serving, as a container probe.

A container engine judges a health check by the probe's exit status alone, so this asks
the standard gRPC health-checking service (grpc.health.v1, which every fl-server
registers for "" and "fedstream.v1.Federation") once, with a deadline, and maps the
answer to 0 (SERVING) or 1 (anything else: NOT_SERVING while the server shuts down,
SERVICE_UNKNOWN, no answer in time, nothing listening). Status 2 is reserved by the
engines, so it is never used.

The probe runs inside the server's own container with the server's environment, so it
reads the address from ``FL_SERVER_PORT`` and ``FL_SERVER_HOST`` when no flag is given:
changing the server's port in one place keeps the probe pointing at it. A server that
serves TLS is probed over TLS with ``--tls-ca`` (and, for mutual TLS, a client certificate
of the probe's own); the probe never skips verification.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

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
    parser.add_argument("--tls-ca", type=Path, help="PEM CA bundle: probe over TLS")
    parser.add_argument("--tls-cert", type=Path, help="PEM client certificate (mutual TLS)")
    parser.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    parser.add_argument("--tls-server-name", help="name to expect in the server certificate")
    return parser


def open_channel(target: str, args: argparse.Namespace) -> grpc.Channel:
    if args.tls_ca is None:
        return grpc.insecure_channel(target)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=args.tls_ca.read_bytes(),
        private_key=None if args.tls_key is None else args.tls_key.read_bytes(),
        certificate_chain=None if args.tls_cert is None else args.tls_cert.read_bytes(),
    )
    options = []
    if args.tls_server_name:
        options.append(("grpc.ssl_target_name_override", args.tls_server_name))
    return grpc.secure_channel(target, credentials, options=options)


def check(channel: grpc.Channel, target: str, service: str, timeout_s: float) -> tuple[int, str]:
    """(exit status, one line saying why) for one Check call."""
    with channel:
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
        if (args.tls_cert is None) != (args.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together")
        target = f"{args.host}:{args.port}"
        channel = open_channel(target, args)
    except (ValueError, OSError) as error:  # a non-numeric FL_SERVER_PORT, an unreadable PEM
        print(f"fl-healthcheck: {error}", file=sys.stderr)
        return UNHEALTHY
    code, reason = check(channel, target, args.service, args.timeout)
    if code != HEALTHY and args.tls_ca is None and os.environ.get(f"{ENV_PREFIX}TLS_CERT"):
        reason += f" (the server serves TLS: {ENV_PREFIX}TLS_CERT is set; pass --tls-ca)"
    print(reason, file=sys.stdout if code == HEALTHY else sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
