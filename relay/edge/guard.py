"""Each HTTP connection's protocol: the relay's bounds, and webhooks answered without ASGI.

uvicorn with httptools bounds neither the size of a request's head nor the time a client takes to
send it or its body (its only timer is the idle keep-alive one); :class:`Guard` adds those bounds.
A connection that opens with a webhook is answered by the guard itself, one write per answer; any
other goes to uvicorn's protocol and the application.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
from typing import Any, Final, cast

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from relay import config, log
from relay.edge import webhook

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
MALFORMED = _response("400 Bad Request", "malformed HTTP request")
UNAVAILABLE = _response("503 Service Unavailable", "temporarily unavailable, retry later")
CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
WEBHOOKS: Final = webhook.PREFIX.encode()


@dataclasses.dataclass
class Limits:
    """The bounds of one worker, and what they refused (shared by all its connections)."""

    max_connections: int
    max_header_bytes: int
    header_timeout_s: float
    body_timeout_s: float
    keepalive_timeout_s: float = 5.0
    open: int = 0
    refused: dict[str, int] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_settings(cls, settings: config.Settings) -> Limits:
        return cls(
            max_connections=settings.max_connections,
            max_header_bytes=settings.max_header_bytes,
            header_timeout_s=settings.header_timeout_s,
            body_timeout_s=settings.body_timeout_s,
            keepalive_timeout_s=settings.keepalive_timeout_s,
        )

    def count(self, why: str) -> None:
        self.refused[why] = self.refused.get(why, 0) + 1


STATE_KEY = "connection_limits"  # where the lifespan state holds the worker's Limits

# where the connection's current request stands
_IDLE, _HEAD, _BODY = range(3)
# who answers the connection: not known before its first head is complete; uvicorn, given the
# bytes as received (PASS) or without the guard following them any more (OPAQUE: a parse error or
# an upgrade); the guard (WEBHOOKS); uvicorn, given requests the guard writes again from what it
# parsed (RELAY: a connection that opened with webhooks, then asked for something else); nobody
# (DONE: a last answer is owed or written, nothing more is read)
_UNDECIDED, _PASS, _OPAQUE, _WEBHOOKS, _RELAY, _DONE = range(6)


class _Pending:
    """An answer owed on the connection, in request order: its bytes once decided."""

    __slots__ = ("close", "data")

    def __init__(self, data: bytes | None, close: bool) -> None:
        self.data = data
        self.close = close


class Guard(asyncio.Protocol):
    """An asyncio protocol that bounds one connection and answers it, or has uvicorn answer it.

    It follows every request with an httptools parser (public API: callbacks only). The first
    request decides who answers the connection: a ``POST /webhooks/qonto/…`` and the guard answers
    it and the connection's next webhooks itself (:class:`relay.edge.webhook.Arrival` decides, one
    write per answer, answers in request order); anything else and every byte goes on unchanged to
    uvicorn's ``HttpToolsProtocol``. Should a connection answered by the guard later ask for
    anything else, the guard hands the rest of it to uvicorn, written again from what it parsed.
    Besides, it

    - closes the connection at once when the worker already holds ``max_connections`` (503);
    - answers 431 and closes when a request's head grows past ``max_header_bytes``, before it is
      buffered (a head is never held beyond that size plus one read);
    - answers 408 and closes when the head is not complete ``header_timeout_s`` after the
      connection opened or the request began; closes when the body is not complete
      ``body_timeout_s`` after the head (an answer may be out already: nothing is written);
    - closes a connection it answers once idle for ``keepalive_timeout_s`` (uvicorn does for its).
    """

    def __init__(self, **uvicorn_arguments: Any) -> None:
        """Keep uvicorn's arguments, for its protocol should the connection need it.

        The worker's :class:`Limits` and intake (:class:`relay.edge.webhook.Desk`) come from the
        application's lifespan state (see :mod:`relay.edge.app`).
        """
        self._arguments = uvicorn_arguments
        state = uvicorn_arguments["app_state"]
        self.limits: Limits = state[STATE_KEY]
        self._desk: webhook.Desk | None = state.get(webhook.STATE_KEY)
        self._connections: set[Any] = uvicorn_arguments["server_state"].connections
        self._inner: HttpToolsProtocol | None = None
        self._loop = asyncio.get_running_loop()
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._mode = _UNDECIDED if self._desk is not None else _PASS
        self._phase = _IDLE
        self._head_bytes = 0  # raw bytes received while a head is incomplete
        self._head_size = 0  # the current head's URL and fields, as parsed
        self._too_large = False
        self._timer: asyncio.TimerHandle | None = None
        self._admitted = False
        self._held: list[bytes] = []  # raw bytes of the first request, until its head decides
        self._url: list[bytes] = []
        self._fields: list[tuple[bytes, bytes]] = []
        self._arrival: webhook.Arrival | None = None  # the webhook being received
        self._pending: collections.deque[_Pending] = collections.deque()
        self._relayed: list[bytes] = []  # requests written again for uvicorn, not yet given
        self._chunked = False  # the relayed request's body is chunked
        self._paused: set[str] = set()  # why reading is paused
        self._closing = False  # close once the answers owed are written (shutdown)
        self._timer_why = ""

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
        if self._mode == _PASS:
            self._uvicorn()

    def data_received(self, data: bytes) -> None:
        transport = self._transport
        if not self._admitted or transport is None or transport.is_closing():
            return
        mode = self._mode
        if mode == _OPAQUE:
            cast(HttpToolsProtocol, self._inner).data_received(data)
            return
        if mode == _DONE:
            return
        if mode == _UNDECIDED:
            self._held.append(data)
        if self._phase != _BODY:
            self._head_bytes += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserCallbackError:  # the relay's fault, not the client's
            logger.exception("http_guard_failed", mode=self._mode)
            self._mode = _DONE
            self._owe(UNAVAILABLE, close=True)
            return
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            self._unparsable(data)
            return
        # a head still incomplete past the bound (raw bytes), or a complete one whose fields add
        # up past it (httptools' callbacks)
        if self._too_large or (
            self._phase == _HEAD and self._head_bytes > self.limits.max_header_bytes
        ):
            self._refuse(HEAD_TOO_LARGE, "header_bytes")
            return
        if self._mode == _PASS:
            inner = cast(HttpToolsProtocol, self._inner)
            if self._held:  # the first head decided just now
                held, self._held = self._held, []
                for chunk in held:
                    inner.data_received(chunk)
            else:
                inner.data_received(data)
        elif self._mode == _RELAY:
            self._relay()

    def _unparsable(self, data: bytes) -> None:
        """Deal with bytes that are not HTTP/1.1 (or an upgrade): uvicorn answers, where it can."""
        self._disarm()
        if self._mode in (_UNDECIDED, _PASS):  # uvicorn's parser answers it (400, or the upgrade)
            held, self._held = self._held or [data], []
            self._mode = _OPAQUE
            inner = self._inner or self._uvicorn()
            for chunk in held:
                inner.data_received(chunk)
        elif self._mode == _WEBHOOKS:
            self._mode = _DONE
            self._owe(MALFORMED, close=True)
        else:  # relayed requests may be in uvicorn's hands: nothing can be answered in order
            self._mode = _DONE
            cast(asyncio.Transport, self._transport).close()

    def eof_received(self) -> bool | None:
        if self._inner is not None:
            self._inner.eof_received()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._arrival is not None:  # a body cut short: its bytes go back to the budget
            self._arrival.release()
            self._arrival = None
        if self._admitted:
            self._admitted = False
            self.limits.open -= 1
            self._connections.discard(self)
            if self._inner is not None:
                self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()
        else:  # a client that does not read its answers sends no more requests
            self._pause("writing")

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()
        else:
            self._resume("writing")

    def shutdown(self) -> None:
        """Close once the answers owed are written (uvicorn's graceful shutdown calls it).

        Once uvicorn has the connection, its protocol (told too) closes it.
        """
        self._closing = True
        if self._inner is None and not self._pending:
            self._idle()

    # ------------------------------------------------------------------ httptools callbacks

    def on_message_begin(self) -> None:
        self._phase = _HEAD
        self._head_size = 0
        if self._timer is None or self._timer_why == "keepalive":
            self._arm(self.limits.header_timeout_s, "header_timeout")
        if self._mode != _PASS:
            self._url = []
            self._fields = []

    def on_url(self, url: bytes) -> None:
        self._grow(len(url))
        if self._mode != _PASS:
            self._url.append(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._grow(len(name) + len(value) + 4)
        if self._mode != _PASS:
            self._fields.append((name, value))

    def _grow(self, size: int) -> None:
        self._head_size += size
        if self._head_size > self.limits.max_header_bytes:
            self._too_large = True

    def on_headers_complete(self) -> None:
        self._phase = _BODY
        self._head_bytes = 0
        self._arm(self.limits.body_timeout_s, "body_timeout")
        if self._mode != _PASS and not self._too_large:
            self._decide()

    def on_body(self, body: bytes) -> None:
        if self._mode == _WEBHOOKS:
            if self._arrival is not None and not self._arrival.feed(body):
                self._refused_early()
        elif self._mode == _RELAY:
            self._relayed.append(b"%x\r\n%s\r\n" % (len(body), body) if self._chunked else body)

    def on_message_complete(self) -> None:
        self._phase = _IDLE
        self._disarm()  # idle from here: the keep-alive timer, once answered
        if self._mode == _WEBHOOKS:
            self._complete()
            if not self._pending:
                self._idle()
        elif self._mode == _RELAY and self._chunked:
            self._relayed.append(b"0\r\n\r\n")

    # ------------------------------------------------------------------ who answers

    def _decide(self) -> None:
        """Route a complete head: a webhook for the guard, anything else for uvicorn."""
        url = b"".join(self._url)
        method = self._parser.get_method()
        raw_id = url.split(b"?", 1)[0][len(WEBHOOKS) :]
        is_webhook = (
            method == b"POST"
            and url.startswith(WEBHOOKS)
            and raw_id != b""
            and b"/" not in raw_id
            and b"%" not in raw_id
        )  # anything else is uvicorn's (the application answers 404 or 405)
        if self._mode == _UNDECIDED:
            if not is_webhook:
                self._mode = _PASS  # data_received gives uvicorn the bytes held so far
                self._uvicorn()
                return
            self._mode = _WEBHOOKS
            self._held = []
            self._connections.add(self)  # uvicorn's graceful shutdown waits for it
        if self._mode == _WEBHOOKS and not is_webhook:
            self._mode = _RELAY
        if self._mode == _RELAY:
            self._write_again(method, url)
            return
        signature_header = content_length = None
        expect = False
        for name, value in self._fields:
            lowered = name.lower()
            if lowered == b"content-length":
                content_length = value
            elif lowered == b"x-qonto-signature":
                signature_header = value.decode("latin-1")
            elif lowered == b"expect":
                expect = value.lower() == b"100-continue"
        desk = cast(webhook.Desk, self._desk)
        arrival = webhook.Arrival(desk, raw_id.decode("latin-1"), content_length, signature_header)
        self._arrival = arrival
        if arrival.refusal is not None:  # a client waiting for 100 Continue sends no body: close
            self._refused_early(
                close=expect or self._closing or not self._parser.should_keep_alive()
            )
        elif expect and not self._pending:
            cast(asyncio.Transport, self._transport).write(CONTINUE)

    def _refused_early(self, *, close: bool = False) -> None:
        """Answer a webhook the head or part of its body refused; the rest of its body is dropped."""
        arrival = cast(webhook.Arrival, self._arrival)
        self._arrival = None
        answer = cast(webhook.Answer, arrival.refusal)
        arrival.record(answer)
        self._owe(webhook.encode(answer, close=close), close=close)

    def _complete(self) -> None:
        """Answer a webhook whose body is in: at once when it is refused, else once queued."""
        arrival = self._arrival
        if arrival is None:  # refused early, answered already
            if not self._parser.should_keep_alive():
                self._owe(b"", close=True)
            return
        self._arrival = None
        close = self._closing or not self._parser.should_keep_alive()
        answer = arrival.settle()
        if answer is not None:
            arrival.record(answer)
            self._owe(webhook.encode(answer, close=close), close=close)
            return
        pending = _Pending(None, close)
        self._pending.append(pending)
        task = self._loop.create_task(_queue(arrival, close))
        task.add_done_callback(lambda done: self._answered(pending, done))

    def _answered(self, pending: _Pending, task: asyncio.Task[bytes]) -> None:
        if task.cancelled():  # the worker is stopping: no answer, the client sends it again
            pending.data, pending.close = b"", True
        else:
            pending.data = task.result()
        self._write()

    def _owe(self, data: bytes, *, close: bool) -> None:
        self._pending.append(_Pending(data, close))
        self._write()

    def _write(self) -> None:
        """Write the answers decided so far, in request order, in one write."""
        pending, out = self._pending, []
        close = False
        while pending and pending[0].data is not None:
            answer = pending.popleft()
            out.append(cast(bytes, answer.data))
            if answer.close:
                close = True
                pending.clear()  # nothing after a closing answer is answered
                self._mode = _DONE
                break
        transport = cast(asyncio.Transport, self._transport)
        if transport.is_closing():
            return
        if out:
            transport.write(out[0] if len(out) == 1 else b"".join(out))
        if close:
            transport.close()
        elif not pending:
            self._idle()

    def _idle(self) -> None:
        """Go on once every answer owed is written: relay, close (shutdown) or wait a while."""
        if self._relayed:
            self._relay()
        elif self._phase == _IDLE and self._mode == _WEBHOOKS:
            if self._closing:
                cast(asyncio.Transport, self._transport).close()
            else:
                self._arm(self.limits.keepalive_timeout_s, "keepalive")

    # ------------------------------------------------------------------ uvicorn

    def _uvicorn(self) -> HttpToolsProtocol:
        inner = HttpToolsProtocol(**self._arguments)
        inner.connection_made(cast(asyncio.Transport, self._transport))
        self._inner = inner
        return inner

    def _write_again(self, method: bytes, url: bytes) -> None:
        """Write a request's head again for uvicorn, from what was parsed of it."""
        version = self._parser.get_http_version().encode()
        lines = [method, b" ", url, b" HTTP/", version, b"\r\n"]
        self._chunked = False
        for name, value in self._fields:
            lines += [name, b": ", value, b"\r\n"]
            if name.lower() == b"transfer-encoding" and b"chunked" in value.lower():
                self._chunked = True
        lines.append(b"\r\n")
        self._relayed.append(b"".join(lines))

    def _relay(self) -> None:
        """Give uvicorn the requests written again, once every answer owed before them is out."""
        if self._pending:
            self._pause("relay")  # _write calls again when they are
            return
        inner = self._inner or self._uvicorn()
        relayed, self._relayed = self._relayed, []
        for chunk in relayed:
            inner.data_received(chunk)
        self._resume("relay")

    def _pause(self, why: str) -> None:
        if not self._paused:
            cast(asyncio.Transport, self._transport).pause_reading()
        self._paused.add(why)

    def _resume(self, why: str) -> None:
        if why in self._paused:
            self._paused.discard(why)
            if not self._paused:
                cast(asyncio.Transport, self._transport).resume_reading()

    # ------------------------------------------------------------------ timers

    def _arm(self, seconds: float, why: str) -> None:
        self._disarm()
        self._timer = self._loop.call_later(seconds, self._expired, why)
        self._timer_why = why

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self, why: str) -> None:
        self._timer = None
        if why == "keepalive":
            cast(asyncio.Transport, self._transport).close()
            return
        # a head begun: tell it why; nothing received yet, or a body (an answer may be out
        # already): close
        self._refuse(TOO_SLOW if self._phase == _HEAD else b"", why)

    def _refuse(self, answer: bytes, why: str) -> None:
        self.limits.count(why)
        self._disarm()
        if self._pending:  # after the answers owed before it, in order (the guard's own)
            self._mode = _DONE
            self._owe(answer, close=True)
            return
        self._mode = _OPAQUE if self._inner is not None else _DONE
        if self._transport is not None and not self._transport.is_closing():
            if answer:
                self._transport.write(answer)
            self._transport.close()


async def _queue(arrival: webhook.Arrival, close: bool) -> bytes:
    """Queue a webhook and render its answer (a failure of the relay's own is a 503)."""
    try:
        answer = await arrival.queue()
    except Exception:
        logger.exception("webhook_failed", connection=arrival.raw_id[:64])
        answer = webhook.UNAVAILABLE
    arrival.record(answer)
    return webhook.encode(answer, close=close)
