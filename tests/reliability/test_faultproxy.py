"""The fault proxy itself, against a real TCP echo server: each fault does what it says.

The reliability tests trust the proxy to slow, hold and cut traffic; if it silently
forwarded everything they would pass without testing anything, so each fault is
checked here on its own first.
"""

from __future__ import annotations

import socket
import socketserver
import threading
import time
from collections.abc import Iterator

import pytest

from tests.faultproxy import FaultProxy


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


@pytest.fixture
def echo_port() -> Iterator[int]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def proxy(echo_port: int) -> Iterator[FaultProxy]:
    with FaultProxy("127.0.0.1", echo_port) as running:
        yield running


def _connect(proxy: FaultProxy, timeout: float = 5.0) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _receive(sock: socket.socket, size: int) -> bytes:
    data = bytearray()
    while len(data) < size:
        piece = sock.recv(size - len(data))
        if not piece:
            break
        data += piece
    return bytes(data)


def _send_and_echo(sock: socket.socket, payload: bytes) -> bytes:
    sender = threading.Thread(target=sock.sendall, args=(payload,), daemon=True)
    sender.start()
    echoed = _receive(sock, len(payload))
    sender.join(timeout=10)
    return echoed


def test_forwards_bytes_both_ways_and_counts_them(proxy: FaultProxy) -> None:
    payload = bytes(range(256)) * 1024
    with _connect(proxy) as sock:
        assert _send_and_echo(sock, payload) == payload
    stats = proxy.stats()
    assert stats.accepted == 1
    assert stats.upstream_bytes == stats.downstream_bytes == len(payload)


def test_throttle_paces_the_transfer(proxy: FaultProxy) -> None:
    rate = 200_000
    payload = b"x" * 100_000
    proxy.throttle(rate)
    with _connect(proxy, timeout=30) as sock:
        started = time.monotonic()
        assert _send_and_echo(sock, payload) == payload
        took = time.monotonic() - started
    # A lower bound only: the proxy sleeps size/rate after each slice it sends, so the
    # echo cannot come back sooner however fast the machine is.
    assert took >= 0.9 * len(payload) / rate


def test_delay_holds_each_read(proxy: FaultProxy) -> None:
    proxy.delay(0.3)
    with _connect(proxy) as sock:
        started = time.monotonic()
        assert _send_and_echo(sock, b"ping") == b"ping"
        assert time.monotonic() - started >= 0.6  # held once each way


def test_stall_holds_bytes_without_closing_then_resume_delivers(proxy: FaultProxy) -> None:
    with _connect(proxy) as sock:
        assert _send_and_echo(sock, b"before") == b"before"
        proxy.stall()
        sock.sendall(b"held")
        sock.settimeout(0.5)
        with pytest.raises(TimeoutError):
            sock.recv(16)  # nothing moves, yet the connection is not closed
        assert proxy.stats().open_connections == 1
        proxy.resume()
        sock.settimeout(5)
        assert _receive(sock, 4) == b"held"


def test_cut_closes_every_open_connection(proxy: FaultProxy) -> None:
    with _connect(proxy) as first, _connect(proxy) as second:
        for sock in (first, second):
            assert _send_and_echo(sock, b"hi") == b"hi"
        assert proxy.cut() == 2
        for sock in (first, second):
            try:
                assert sock.recv(16) == b""
            except ConnectionResetError:
                pass  # an abort may arrive as a reset: closed either way
    # New connections still work after a cut.
    with _connect(proxy) as sock:
        assert _send_and_echo(sock, b"again") == b"again"


def test_cut_after_a_byte_budget(proxy: FaultProxy) -> None:
    proxy.cut_after(1000)
    with _connect(proxy) as sock:
        sock.sendall(b"y" * 5000)
        got = bytearray()
        try:
            while piece := sock.recv(65536):
                got += piece
        except ConnectionResetError:
            pass
    stats = proxy.stats()
    assert stats.cuts == 1
    assert stats.upstream_bytes + stats.downstream_bytes == 1000
    assert len(got) < 1000


def test_refuse_closes_new_connections(proxy: FaultProxy) -> None:
    proxy.refuse()
    with _connect(proxy) as sock:
        try:
            sock.sendall(b"hello")
            assert sock.recv(16) == b""
        except (ConnectionResetError, BrokenPipeError):
            pass
    assert proxy.stats().refused == 1
    proxy.refuse(False)
    with _connect(proxy) as sock:
        assert _send_and_echo(sock, b"ok") == b"ok"
