"""uvicorn's HTTP protocol (httptools) with the connection limits a public endpoint needs, as nginx applies
them: a request's headers must arrive within `header_timeout`, its body may pause at most `body_timeout`,
a kept-alive connection idles at most `idle_timeout`, and at most `connections` are open at once. A new
connection beyond the cap closes the one that has waited longest without a request being answered on it
(half-sent headers, a stalled body, an idle keep-alive), so clients that send requests are served while a
flood of idle connections holds the cap; if every open connection is busy with a request, the new one closes.
A request answered before its body arrived (refused from its headers) is read no further: the connection
half-closes and closes LINGER seconds later, so a flood of huge bodies costs neither memory nor the loop's time.
"""
from __future__ import annotations

import logging
import time
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from .limits import Limits

log = logging.getLogger("compilers")
LINGER = 1.0                      # seconds a refused request's connection stays open for its answer to be read
WARN_EVERY = 60.0                 # seconds between warnings that the connection cap is reached
_TIMEOUT = b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


def protocol(limits: Limits) -> type[HttpToolsProtocol]:
    """The protocol class for uvicorn's `http` setting, holding these limits."""
    return type("LimitedHttp", (LimitedHttp,), {"limits": limits, "cap": limits.connections})


class LimitedHttp(HttpToolsProtocol):
    limits: Limits
    cap: int
    warned_at = -WARN_EVERY           # when the cap was last warned of (one warning a minute at most)

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._timer = None
        self._since = time.monotonic()    # when this connection last started waiting for a client
        self._reading_body = False
        self.refused = False

    # -- the cap ----------------------------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        if len(self.connections) >= self.cap and not self._evict():
            log.warning("connection from %s refused: %d connections are open and each is busy with a request",
                        _peer(transport), len(self.connections))
            self.refused = True
            transport.abort()
            return
        super().connection_made(transport)
        self._arm(self.limits.header_timeout)

    def _evict(self) -> bool:
        """Close the open connection that has waited longest for its client; False if none is waiting."""
        waiting = [c for c in self.connections if isinstance(c, LimitedHttp) and c._waiting_for_client()]
        if not waiting:
            return False
        oldest = min(waiting, key=lambda c: c._since)
        now = time.monotonic()
        if now - LimitedHttp.warned_at > WARN_EVERY:
            LimitedHttp.warned_at = now
            log.warning("%d connections are open, the most this server holds (--max-connections): closing the "
                        "longest idle ones for new clients", self.cap)
        log.debug("closed connection from %s (waiting %.1f s) for a new one", _peer(oldest.transport),
                  now - oldest._since)
        oldest._close()
        return True

    def _waiting_for_client(self) -> bool:
        """No request of its being worked on: it idles, or its headers or body are still arriving."""
        return self.cycle is None or self.cycle.response_complete or self._reading_body

    # -- the timeouts -----------------------------------------------------------------------------------
    def _arm(self, seconds: float | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = None if seconds is None else self.loop.call_later(seconds, self._timed_out)

    def _timed_out(self) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        if self._reading_body and self.flow.read_paused:     # the app has not read what came: not the client's wait
            self._arm(self.limits.body_timeout)
            return
        log.debug("closed connection from %s: %s", _peer(self.transport),
                 "the request body stalled" if self._reading_body else "no complete request headers in time")
        if not self._reading_body:
            self.transport.write(_TIMEOUT)
        self._close()

    def _close(self) -> None:
        self._arm(None)
        self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self._reading_body:                # a body that arrives is not stalled, however slowly it arrives
            self._since = time.monotonic()
            self._arm(self.limits.body_timeout)
        super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._since = time.monotonic()
        self._arm(self.limits.header_timeout)

    def on_headers_complete(self) -> None:
        super().on_headers_complete()
        self._reading_body = True
        self._arm(self.limits.body_timeout)

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self._reading_body = False
        self._arm(None)

    def on_response_complete(self) -> None:
        self._since = time.monotonic()
        super().on_response_complete()       # arms uvicorn's keep-alive timeout (idle_timeout)
        if self._reading_body and not self.transport.is_closing():
            self._linger()

    def _linger(self) -> None:
        """The answer went out before the request's body had arrived (refused from its headers): read no more of
        it, say so (FIN), and close a moment later, when the client has had the answer; closing at once could
        reset the connection before the client reads it, and reading the rest would spend the loop on junk."""
        self._arm(None)
        self._unset_keepalive_if_required()
        self.flow.pause_reading()
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER, self.transport.abort)

    def connection_lost(self, exc: Exception | None) -> None:
        self._arm(None)
        if not self.refused:
            super().connection_lost(exc)


def _peer(transport) -> str:
    peer = transport.get_extra_info("peername") if transport is not None else None
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) and len(peer) >= 2 else "an unknown peer"
