"""The HTTP protocol uvicorn runs, with a bound on how long a request's headers may take (HEADER_READ_TIMEOUT).

uvicorn bounds an idle keep-alive connection (timeout_keep_alive) but not one that is opened and then sends
nothing, or trickles a request's headers a byte at a time: each holds a socket for ever, and enough of them use up
the process's file descriptors (slowloris). The ASGI app cannot help, since it sees a request only once its
headers are complete, so the timer lives here: armed when a connection opens or a request's first byte arrives,
disarmed when its headers are complete. A reverse proxy in front does the same (nginx's client_header_timeout).
"""

from __future__ import annotations

import asyncio
import logging

# uvicorn[standard] brings httptools, and uvicorn's "auto" picks this protocol whenever httptools is installed.
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger("glm_serve.access")


class HeaderTimeoutProtocol(HttpToolsProtocol):
    header_timeout = 30.0
    _header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm_header_timer()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._header_timer is None:  # a connection's first request keeps the clock started when it opened
            self._arm_header_timer()

    def on_headers_complete(self) -> None:
        self._disarm_header_timer()
        super().on_headers_complete()

    def connection_lost(self, exc) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        self._header_timer = self.loop.call_later(self.header_timeout, self._headers_too_slow)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
            log.info("closed the connection from %s: no complete request headers within %g s (HEADER_READ_TIMEOUT)",
                     client, self.header_timeout)
            self.transport.close()


def protocol_class(header_timeout: float) -> type[HeaderTimeoutProtocol]:
    """uvicorn builds one protocol per connection from a class, so the setting travels as a class attribute."""
    return type("HeaderTimeoutProtocol", (HeaderTimeoutProtocol,), {"header_timeout": header_timeout})
