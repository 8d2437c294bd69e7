"""A TCP proxy that injects network faults between one client and the server.

Real sockets on both sides: the client connects to the proxy's loopback port, the proxy
connects on to the server, and the bytes in between can be delayed, throttled, held
back (the connection stays open but nothing moves, like a dead router), cut (every
connection closed at once, now or after a byte budget) or refused (new connections
are closed as soon as they are accepted). The proxy runs its own event loop in a
daemon thread, so blocking end-to-end tests control it with plain method calls.

Each direction of each connection is a reader that pulls from one socket and a writer
that pushes into the other, joined by a bounded queue: while the proxy holds traffic
back neither side reads, so the peers' own flow control fills up exactly as it would
behind a stalled link, and the proxy's memory stays bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

READ_BYTES = 64 << 10
QUEUE_DEPTH = 4  # reads in flight per direction: at most 256 KiB held per direction

T = TypeVar("T")


@dataclass
class Stats:
    """What the proxy has seen so far (read under the proxy's lock via ``stats()``)."""

    accepted: int = 0
    refused: int = 0
    cuts: int = 0
    upstream_bytes: int = 0  # client -> server
    downstream_bytes: int = 0  # server -> client
    open_connections: int = 0


@dataclass(eq=False)  # identity-hashed: links live in a set
class _Link:
    client: asyncio.StreamWriter
    server: asyncio.StreamWriter
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def abort(self) -> None:
        for writer in (self.client, self.server):
            writer.transport.abort()


class FaultProxy:
    """Forward 127.0.0.1:<port> to ``target``; faults can be switched on at any moment."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None
        self._links: set[_Link] = set()
        self._stats = Stats()
        # Fault settings; only the proxy's loop reads or writes them.
        self._delay_s = 0.0
        self._rate_bytes_s: float | None = None
        self._flowing: asyncio.Event | None = None
        self._refusing = False
        self._cut_budget: int | None = None
        self._final: Stats | None = None

    # ---- lifecycle -------------------------------------------------------------------

    def start(self) -> FaultProxy:
        self._thread.start()
        self.port = self._call(self._start())
        return self

    async def _start(self) -> int:
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    def close(self) -> None:
        if not self._thread.is_alive():
            return
        self._call(self._close())
        self._final = self.stats()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        links = list(self._links)
        for link in links:
            link.abort()
        tasks = [task for link in links for task in link.tasks]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    # ---- faults (called from the test's thread) --------------------------------------

    def delay(self, seconds: float) -> None:
        """Hold every read this long before forwarding it (added one-way latency)."""
        self._set(lambda: setattr(self, "_delay_s", seconds))

    def throttle(self, bytes_per_s: float | None) -> None:
        """Forward at most this many bytes per second per direction (None: unlimited)."""
        self._set(lambda: setattr(self, "_rate_bytes_s", bytes_per_s))

    def stall(self) -> None:
        """Stop moving bytes in both directions; every connection stays open."""
        self._set(lambda: self._gate().clear())

    def resume(self) -> None:
        self._set(lambda: self._gate().set())

    def refuse(self, refusing: bool = True) -> None:
        """Close new connections as soon as they are accepted."""
        self._set(lambda: setattr(self, "_refusing", refusing))

    def cut(self) -> int:
        """Close every open connection now; returns how many were cut."""
        return self._call(self._cut_now())

    def cut_after(self, nbytes: int) -> None:
        """Close every open connection once ``nbytes`` more bytes have been forwarded."""
        self._set(lambda: setattr(self, "_cut_budget", nbytes))

    def stats(self) -> Stats:
        """Counters so far (after ``close``: the final ones)."""
        if self._final is not None:
            return Stats(**self._final.__dict__)
        return self._call(self._snapshot())

    # ---- internals -------------------------------------------------------------------

    def _gate(self) -> asyncio.Event:
        assert self._flowing is not None, "proxy not started"
        return self._flowing

    def _call(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=30)

    def _set(self, change: Callable[[], object]) -> None:
        async def apply() -> None:
            change()

        self._call(apply())

    async def _snapshot(self) -> Stats:
        return Stats(**self._stats.__dict__)

    async def _cut_now(self) -> int:
        links = list(self._links)
        for link in links:
            link.abort()
        self._stats.cuts += len(links)
        self._cut_budget = None
        return len(links)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._refusing:
            self._stats.refused += 1
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._stats.accepted += 1
        link = _Link(writer, up_writer)
        self._links.add(link)
        self._stats.open_connections = len(self._links)
        link.tasks = [
            asyncio.create_task(self._pipe(link, reader, up_writer, "upstream_bytes")),
            asyncio.create_task(self._pipe(link, up_reader, writer, "downstream_bytes")),
        ]
        await asyncio.gather(*link.tasks, return_exceptions=True)
        link.abort()
        self._links.discard(link)
        self._stats.open_connections = len(self._links)

    async def _pipe(
        self,
        link: _Link,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        counter: str,
    ) -> None:
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(QUEUE_DEPTH)
        pump = asyncio.create_task(self._read_into(reader, queue))
        try:
            while True:
                due, data = await queue.get()
                if not data:
                    with contextlib.suppress(OSError, RuntimeError):
                        writer.write_eof()
                    return
                await _sleep_until(due)
                await self._forward(link, writer, data, counter)
        except (OSError, ConnectionError):
            link.abort()
        finally:
            pump.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError, ConnectionError):
                await pump

    async def _read_into(
        self, reader: asyncio.StreamReader, queue: asyncio.Queue[tuple[float, bytes]]
    ) -> None:
        while True:
            await self._gate().wait()
            try:
                data = await reader.read(READ_BYTES)
            except (OSError, ConnectionError):
                data = b""
            await queue.put((time.monotonic() + self._delay_s, data))
            if not data:
                return

    async def _forward(
        self, link: _Link, writer: asyncio.StreamWriter, data: bytes, counter: str
    ) -> None:
        view = memoryview(data)
        while view:
            await self._gate().wait()
            rate = self._rate_bytes_s
            # Throttled: send in slices of 1/20 s worth of bytes and pace each one.
            size = len(view) if rate is None else max(1, min(len(view), int(rate / 20)))
            if self._cut_budget is not None:
                if self._cut_budget <= 0:
                    await self._cut_now()
                    return
                size = min(size, self._cut_budget)
            writer.write(view[:size])
            await writer.drain()
            setattr(self._stats, counter, getattr(self._stats, counter) + size)
            view = view[size:]
            if self._cut_budget is not None:
                self._cut_budget -= size
                if self._cut_budget <= 0:
                    await self._cut_now()
                    return
            if rate is not None:
                await asyncio.sleep(size / rate)


async def _sleep_until(due: float) -> None:
    remaining = due - time.monotonic()
    if remaining > 0:
        await asyncio.sleep(remaining)
