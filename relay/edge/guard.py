"""Bounds on every HTTP connection, in front of uvicorn's own protocol (which has none of these).

uvicorn with httptools bounds neither the size of a request's head nor the time a client takes to
send it or its body (its only timer is the idle keep-alive one); :class:`Guard` adds those bounds.
Idle keep-alive connections are closed by uvicorn itself (``timeout_keep_alive``).
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any, cast

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from relay import config, log

logger = log.get(__name__)


def _response(status: str, reason: str) -> bytes:
    body = f'{{"error": "{reason}"}}'.encode()
    return (
        f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\nconnection: close\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode() + body


TOO_MANY = _response("503 Service Unavailable", "too many connections, retry later")
HEAD_TOO_LARGE = _response("431 Request Header Fields Too Large", "request head too large")
TOO_SLOW = _response("408 Request Timeout", "request not received in time")


@dataclasses.dataclass
class Limits:
    """The bounds of one worker, and what they refused (shared by all its connections)."""

    max_connections: int
    max_header_bytes: int
    header_timeout_s: float
    body_timeout_s: float
    open: int = 0
    refused: dict[str, int] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_settings(cls, settings: config.Settings) -> Limits:
        return cls(
            max_connections=settings.max_connections,
            max_header_bytes=settings.max_header_bytes,
            header_timeout_s=settings.header_timeout_s,
            body_timeout_s=settings.body_timeout_s,
        )

    def count(self, why: str) -> None:
        self.refused[why] = self.refused.get(why, 0) + 1


_IDLE, _HEAD, _BODY, _OPAQUE = range(4)
STATE_KEY = "connection_limits"  # where the lifespan state holds the worker's Limits


class Guard(asyncio.Protocol):
    """An asyncio protocol that bounds one connection and hands every byte to uvicorn's protocol.

    It sits between the socket and uvicorn's ``HttpToolsProtocol``, follows the messages with a
    second, cheap httptools parser (public API: callbacks only) and forwards every byte unchanged.
    Besides, it

    - closes the connection at once when the worker already holds ``max_connections`` (503);
    - answers 431 and closes when a request's head grows past ``max_header_bytes``, before uvicorn
      has buffered it (a head is never held beyond that size plus one read);
    - answers 408 and closes when the head is not complete ``header_timeout_s`` after the
      connection opened or the request began; closes when the body is not complete
      ``body_timeout_s`` after the head (uvicorn may have answered already: nothing is written).
    """

    def __init__(self, **uvicorn_arguments: Any) -> None:
        """Wrap uvicorn's protocol, built from its arguments.

        The worker's :class:`Limits` come from the application's lifespan state
        (``connection_limits``, see :mod:`relay.edge.app`).
        """
        self.limits: Limits = uvicorn_arguments["app_state"][STATE_KEY]
        self._inner = HttpToolsProtocol(**uvicorn_arguments)
        self._loop = asyncio.get_running_loop()
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._state = _IDLE
        self._head_bytes = 0  # raw bytes received while a head is incomplete
        self._head_size = 0  # the current head's URL and fields, as parsed
        self._too_large = False
        self._timer: asyncio.TimerHandle | None = None
        self._admitted = False

    # ------------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's is one, without subclassing it
        self._transport = transport
        limits = self.limits
        if limits.open >= limits.max_connections:
            limits.count("connections")
            transport.write(TOO_MANY)
            transport.close()
            return
        limits.open += 1
        self._admitted = True
        self._arm(limits.header_timeout_s, "header_timeout")  # a socket that sends nothing
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if not self._admitted or self._transport is None or self._transport.is_closing():
            return
        if self._state != _OPAQUE:
            if self._state in (_IDLE, _HEAD):
                self._head_bytes += len(data)
            try:
                self._parser.feed_data(data)
            except (httptools.HttpParserError, httptools.HttpParserUpgrade):
                self._state = _OPAQUE  # uvicorn's parser answers it (400, or the upgrade)
                self._disarm()
            # a head still incomplete past the bound (raw bytes), or a complete one whose fields add
            # up past it (httptools' callbacks)
            if self._too_large or (
                self._state == _HEAD and self._head_bytes > self.limits.max_header_bytes
            ):
                self._refuse(HEAD_TOO_LARGE, "header_bytes")
                return
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        if self._admitted:
            self._inner.eof_received()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._admitted:
            self._admitted = False
            self.limits.open -= 1
            self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    # ------------------------------------------------------------------ httptools callbacks

    def on_message_begin(self) -> None:
        self._state = _HEAD
        self._head_size = 0
        if self._timer is None:
            self._arm(self.limits.header_timeout_s, "header_timeout")

    def on_url(self, url: bytes) -> None:
        self._grow(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self._grow(len(name) + len(value) + 4)

    def _grow(self, size: int) -> None:
        self._head_size += size
        if self._head_size > self.limits.max_header_bytes:
            self._too_large = True

    def on_headers_complete(self) -> None:
        self._state = _BODY
        self._head_bytes = 0
        self._arm(self.limits.body_timeout_s, "body_timeout")

    def on_message_complete(self) -> None:
        self._state = _IDLE
        self._disarm()  # idle from here: uvicorn's keep-alive timer

    # ------------------------------------------------------------------ timers

    def _arm(self, seconds: float, why: str) -> None:
        self._disarm()
        self._timer = self._loop.call_later(seconds, self._expired, why)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self, why: str) -> None:
        self._timer = None
        # a head begun: tell it why; nothing received yet, or a body (uvicorn may have answered
        # already): close
        self._refuse(TOO_SLOW if self._state == _HEAD else b"", why)

    def _refuse(self, answer: bytes, why: str) -> None:
        self.limits.count(why)
        self._state = _OPAQUE
        self._disarm()
        if self._transport is not None and not self._transport.is_closing():
            if answer:
                self._transport.write(answer)
            self._transport.close()
