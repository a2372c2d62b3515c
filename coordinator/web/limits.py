"""What one client may hold of the HTTP side's connections, and how loudly running out is said.

An outside run held 1050 sockets open on the HTTP port, each dripping one header line every few
seconds (slowloris): aiohttp waited for their request heads for ever, the coordinator ran out of
file descriptors (so the CLI and workers could not reach gRPC either), and asyncio's accept loop
logged a traceback for every failed accept, 17 MB a minute. Here:

- a connection whose first request head is not complete within ``HEAD_TIMEOUT_S`` is closed (the
  heads after it are bounded by aiohttp's keep-alive timeout, set in server.py; aiohttp before
  3.14 did not bound the first one);
- a source address holds at most ``MAX_PER_PEER`` connections and the port ``MAX_CONNECTIONS``
  in all, so a flood from one machine cannot use the descriptors gRPC needs: more are closed at
  once (a browser opens about six per site);
- running out of descriptors is logged once, then as a count at most every ``LOG_EVERY_S``.

The guard wraps aiohttp's protocol at the socket level (asyncio's Protocol API only), so it does
not depend on aiohttp's internals.
"""

from __future__ import annotations

import asyncio
import errno
import os
import time
from collections import Counter
from typing import Callable

from herd import log

logger = log.get(__name__)
HEAD_TIMEOUT_S = 10.0  # a browser or HTTP client sends its head in one packet, at once
MAX_PER_PEER = 64  # also the bound behind a reverse proxy, where every client is the proxy
MAX_CONNECTIONS = 512  # half the usual soft limit of 1024 descriptors: the rest is gRPC's
LOG_EVERY_S = 60.0
OUT_OF_RESOURCES = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class Quiet:
    """Says a repeated trouble once, then how often it happened, at most every ``every_s``."""

    def __init__(self, event: str, every_s: float = LOG_EVERY_S,
                 clock: Callable[[], float] = time.monotonic):
        self.event, self.every_s, self.clock = event, every_s, clock
        self._last: float | None = None
        self._count = 0

    def happened(self, **fields) -> None:
        self._count += 1
        now = self.clock()
        if self._last is None or now - self._last >= self.every_s:
            logger.warning(self.event, times=self._count, **fields)
            self._last, self._count = now, 0


class AcceptErrors:
    """The HTTP loop's exception handler: out-of-descriptor errors from accept() (asyncio retries
    them by itself a second later) through ``Quiet``; anything else as asyncio would say it."""

    def __init__(self, every_s: float = LOG_EVERY_S, clock: Callable[[], float] = time.monotonic):
        self._quiet = Quiet("http_accept_failing", every_s, clock)

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in OUT_OF_RESOURCES:
            self._quiet.happened(error=os.strerror(exc.errno),
                                 hint="too many connections to the HTTP port: raise the "
                                 "coordinator's descriptor limit (LimitNOFILE) or find the flood")
            return
        loop.default_exception_handler(context)


class Admission:
    """Counts the open connections per source address and hands out guarded protocols."""

    def __init__(self, max_per_peer: int = MAX_PER_PEER, max_total: int = MAX_CONNECTIONS,
                 head_timeout_s: float = HEAD_TIMEOUT_S):
        self.max_per_peer, self.max_total = max_per_peer, max_total
        self.head_timeout_s = head_timeout_s
        self.open: Counter[str] = Counter()
        self._refused = Quiet("http_connection_refused")

    def factory(self, make: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        """A protocol factory for ``loop.create_server``, around aiohttp's ``make``."""
        return lambda: _Guarded(self, make)

    def admit(self, peer: str) -> bool:
        if self.open[peer] >= self.max_per_peer or self.open.total() >= self.max_total:
            self._refused.happened(peer=peer, open_from_peer=self.open[peer],
                                   open=self.open.total())
            return False
        self.open[peer] += 1
        return True

    def release(self, peer: str) -> None:
        self.open[peer] -= 1
        if self.open[peer] <= 0:
            del self.open[peer]


class _Guarded(asyncio.Protocol):
    """aiohttp's protocol for one connection, created only once the connection is admitted,
    with a deadline for the connection's first request head."""

    def __init__(self, admission: Admission, make: Callable[[], asyncio.Protocol]):
        self._admission, self._make = admission, make
        self._inner: asyncio.Protocol | None = None
        self._peer = ""
        self._timer: asyncio.TimerHandle | None = None
        self._tail = b""  # the last bytes seen, for a head end split across two reads

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        self._peer = str(peer[0]) if peer else "?"
        if not self._admission.admit(self._peer):
            self._peer = ""
            transport.abort()  # (nothing was read: closing at once frees the descriptor)
            return
        self._timer = asyncio.get_running_loop().call_later(
            self._admission.head_timeout_s, transport.abort)
        self._inner = self._make()
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._inner is None:
            return
        if self._timer is not None:
            if b"\r\n\r\n" in self._tail + data:
                self._timer.cancel()
                self._timer = None
            else:
                self._tail = (self._tail + data)[-3:]
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._peer:
            self._admission.release(self._peer)
            self._peer = ""
        if self._inner is not None:
            self._inner.connection_lost(exc)
