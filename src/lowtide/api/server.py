"""The HTTP server Lowtide starts: uvicorn, with the limits a public port needs.

uvicorn times out idle keep-alive connections but not a request whose headers never finish, nor
a body that stops arriving, and it accepts connections until the process runs out of file
descriptors: a thousand half-open sockets lock every client out. The protocol below closes a
connection whose headers take longer than `header_timeout` in total (slow drip included), or
whose body goes `read_timeout` without a byte, and turns away connections past
`max_connections` at once, so what one client holds stays bounded.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from lowtide.config import ServerConfig

log = logging.getLogger("lowtide.api")

# Descriptors the process needs besides client connections: database, blobs, upstreams, logs.
_SPARE_DESCRIPTORS = 512


class _GuardedProtocol(HttpToolsProtocol):
    limits: ServerConfig  # set on the subclass that `serve` builds

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self._deadline: asyncio.TimerHandle | None = None
        self._idle: asyncio.TimerHandle | None = None
        self._in_request = True  # from the first byte until the body is complete
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            log.warning("connection limit (%d) reached: closing a new one", len(self.connections))
            transport.close()
            return
        self._arm_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._in_request:
            self._rearm_idle()
        super().data_received(data)

    def on_message_begin(self) -> None:
        self._in_request = True
        if self._deadline is None:
            self._arm_deadline()
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._in_request = False
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        super().on_message_complete()

    def _arm_deadline(self) -> None:
        self._deadline = self.loop.call_later(self.limits.header_timeout, self._too_slow)
        self._rearm_idle()

    def _rearm_idle(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
        self._idle = self.loop.call_later(self.limits.read_timeout, self._too_slow)

    def _disarm(self) -> None:
        for timer in (self._deadline, self._idle):
            if timer is not None:
                timer.cancel()
        self._deadline = self._idle = None

    def _too_slow(self) -> None:
        if self.flow is not None and self.flow.read_paused:
            self._rearm_idle()  # we stopped reading (the app is busy): not the client's delay
            return
        self._disarm()
        if not self.transport.is_closing():
            self.transport.close()


def guarded_protocol(limits: ServerConfig) -> type[HttpToolsProtocol]:
    return type("GuardedHttpProtocol", (_GuardedProtocol,), {"limits": limits})


def raise_descriptor_limit(connections: int) -> None:
    """Let the process hold `connections` sockets plus what it needs itself, if the system allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = connections + _SPARE_DESCRIPTORS
    if soft != resource.RLIM_INFINITY and soft < wanted:
        ceiling = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (ceiling, hard))
        if ceiling < wanted:
            log.warning(
                "only %d file descriptors allowed: max_connections=%d may run out",
                ceiling,
                connections,
            )


def serve(app: Any, host: str, port: int, limits: ServerConfig, **options: Any) -> None:
    raise_descriptor_limit(limits.max_connections)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        http=guarded_protocol(limits),
        timeout_keep_alive=int(max(1, limits.keep_alive_timeout)),
        **options,
    )
    uvicorn.Server(config).run()
