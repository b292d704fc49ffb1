"""The webhook intake, which verifies Qonto's signature, queues the raw event durably and answers.

``POST /webhooks/qonto/{connection_id}`` answers 202 only after RabbitMQ confirmed the persistent
message; 404 for an unknown or stopped connection, 413 over 1 MiB, 401 for a bad or stale signature,
400 for a body that is not an event, 503 when the event could not be queued (Qonto then retries).
Read :class:`Arrival` (the decisions, whatever carries the webhook), then :class:`BodyBudget`;
:class:`relay.edge.guard.Guard` and :class:`Intake` carry webhooks to it; the connections' secrets
come from :mod:`relay.edge.secret_cache`.
"""

from __future__ import annotations

import dataclasses
import email.utils
import functools
import http
import time
import uuid
from collections.abc import Mapping
from typing import Final

import orjson
from starlette.types import ASGIApp, Receive, Scope, Send

from relay import errors, log
from relay.broker import amqp
from relay.domain import heartbeat
from relay.edge import metrics, secret_cache, signature

logger = log.get(__name__)

MAX_BODY: Final = 1024 * 1024


class BodyBudget:
    """The bytes of webhook bodies one worker may hold at once (``RELAY_BODY_BUFFER_BYTES``).

    A body takes its declared length before it is read (a chunked one, as it grows) and gives it
    back once read or refused; beyond the budget the intake answers 503 before reading the body.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    def take(self, size: int) -> bool:
        if self.held + size > self.limit:
            return False
        self.held += size
        return True

    def give(self, size: int) -> None:
        self.held -= size


PREFIX: Final = "/webhooks/qonto/"
STATE_KEY: Final = "intake"  # where the lifespan state holds the worker's Desk

Answer = tuple[int, str, Mapping[str, object], dict[str, str]]
"""An answer: status, outcome (metrics, log), JSON payload, context for the log line."""

UNAVAILABLE: Final[Answer] = (
    503,
    "unavailable",
    {"error": "temporarily unavailable, retry later"},
    {},
)
UNKNOWN: Final[Answer] = (404, "unknown_connection", {"error": "unknown connection"}, {})
GONE: Final[Answer] = (
    404,
    "unknown_connection",
    {"error": "unknown or disconnected connection"},
    {},
)
TOO_LARGE: Final[Answer] = (413, "too_large", {"error": f"body larger than {MAX_BODY} bytes"}, {})
BAD_LENGTH: Final[Answer] = (400, "bad_request", {"error": "invalid Content-Length"}, {})
BUSY: Final[Answer] = (503, "busy", {"error": "too many webhooks in flight, retry later"}, {})
DISCONNECTED: Final[Answer] = (400, "client_disconnected", {"error": "client disconnected"}, {})


@dataclasses.dataclass(frozen=True, slots=True)
class Desk:
    """What one worker's intake works with, whichever path a webhook takes to it.

    A webhook reaches it through :class:`relay.edge.guard.Guard` (a connection that opens with a
    webhook, the hot path) or through the ASGI application (:class:`Intake`).
    """

    secrets: secret_cache.SecretCache
    bodies: BodyBudget
    events: amqp.Batcher
    metrics: metrics.Metrics
    work: heartbeat.Work


class Arrival:
    """One webhook, from its complete head to its answer, without I/O of its own.

    Made when the head is in, it refuses at once what the head decides (an unknown connection, a
    bad or too large ``Content-Length``, no room left in the body budget: :attr:`refusal`); then
    takes the body piece by piece (:meth:`feed`), and :meth:`settle` decides what the body alone
    decides. What is left, the lookup of a connection the cache cannot tell and the publish, is
    :meth:`queue`.
    """

    __slots__ = (
        "_chunks",
        "_connection_id",
        "_event",
        "_held",
        "_secrets",
        "_signature",
        "_size",
        "desk",
        "raw_id",
        "refusal",
        "started",
    )

    def __init__(
        self, desk: Desk, raw_id: str, content_length: bytes | None, signature_header: str | None
    ) -> None:
        self.desk = desk
        self.raw_id = raw_id
        self.started = time.perf_counter()
        self.refusal: Answer | None = None
        self._signature = signature_header
        self._chunks: list[bytes] = []
        self._size = 0
        self._held = 0  # bytes taken from the worker's body budget
        self._secrets: tuple[str, ...] | None = None  # None: to be looked up
        self._event: tuple[str, str] = ("", "")  # event id and topic, once judged
        try:
            self._connection_id = uuid.UUID(raw_id)
        except ValueError:
            self.refusal = UNKNOWN
            return
        self._secrets = desk.secrets.at_once(self._connection_id)
        if self._secrets == ():
            self.refusal = GONE
        elif content_length is not None:
            self.refusal = self._declare(content_length)

    def _declare(self, content_length: bytes) -> Answer | None:
        if not (content_length.isascii() and content_length.isdigit()) or len(content_length) > 12:
            return BAD_LENGTH
        declared = int(content_length)
        if declared > MAX_BODY:
            return TOO_LARGE
        if not self.desk.bodies.take(declared):
            return BUSY
        self._held = declared
        return None

    def feed(self, chunk: bytes) -> bool:
        """Take a piece of the body; False once the webhook is refused (its body is not kept)."""
        if self.refusal is not None:
            return False
        self._size += len(chunk)
        if self._size > MAX_BODY:
            self.refuse(TOO_LARGE)
            return False
        if self._size > self._held:
            if not self.desk.bodies.take(self._size - self._held):
                self.refuse(BUSY)
                return False
            self._held = self._size
        self._chunks.append(chunk)
        return True

    def refuse(self, answer: Answer) -> None:
        """Refuse the webhook with this answer, letting its body go."""
        self.refusal = answer
        self._chunks = []
        self.release()

    def release(self) -> None:
        """Give the body's bytes back to the worker's budget (once; again is harmless)."""
        self.desk.bodies.give(self._held)
        self._held = 0

    def settle(self) -> Answer | None:
        """Decide what the complete body decides; None when :meth:`queue` is to answer."""
        self.release()
        if self.refusal is not None:
            return self.refusal
        if self._secrets is None:
            return None  # the cache could not tell at once: queue() looks the connection up
        return self._judge(self._secrets)

    def _judge(self, secrets: tuple[str, ...]) -> Answer | None:
        body = self.body
        try:
            signature.verify(self._signature, body, secrets, now=time.time())
        except signature.Rejected as exc:
            return 401, "bad_signature", {"error": exc.reason}, {}
        try:
            event = orjson.loads(body)
        except orjson.JSONDecodeError:
            return 400, "not_json", {"error": "body is not JSON"}, {}
        if (
            not isinstance(event, dict)
            or not isinstance(event.get("id"), str)
            or not event["id"]
            or len(event["id"]) > 200
            or not isinstance(event.get("type"), str)
        ):
            return (
                400,
                "not_an_event",
                {"error": "not a Qonto event (needs string id and type)"},
                {},
            )
        self._event = (event["id"], str(event["type"])[:100])
        return None

    @property
    def body(self) -> bytes:
        chunks = self._chunks
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def queue(self) -> Answer:
        """Publish the event and answer 202 once RabbitMQ confirmed it, or say why not.

        The connection is looked up first when the cache could not tell at once.
        """
        if self._secrets is None:
            try:
                self._secrets = await self.desk.secrets.secrets_for(self._connection_id)
            except errors.DatabaseUnavailable:
                return UNAVAILABLE
            if not self._secrets:
                return GONE
            refusal = self._judge(self._secrets)
            if refusal is not None:
                return refusal
        event_id, topic = self._event
        try:
            await self.desk.events.publish_event(
                self.body, connection_id=str(self._connection_id), event_id=event_id
            )
        except errors.BrokerUnavailable as exc:
            error = "could not queue the event, retry later"
            return 503, "unavailable", {"error": error}, {"event_id": event_id, "reason": str(exc)}
        return (
            202,
            "queued",
            {"status": "queued", "event_id": event_id},
            {
                "event_id": event_id,
                "topic": topic,
            },
        )

    def record(self, answer: Answer) -> None:
        """Count the answer in the worker's metrics and heartbeat and write its log line."""
        status, outcome, _, context = answer
        elapsed = time.perf_counter() - self.started
        self.desk.metrics.webhook(outcome, elapsed)
        if status == 202:
            self.desk.work.add()
        log.fast(
            "webhook_accepted" if status == 202 else "webhook_rejected",
            connection=self.raw_id[:64],
            outcome=outcome,
            status=status,
            duration_ms=round(elapsed * 1000, 2),
            **context,
        )


class Intake:
    """ASGI middleware that answers ``POST /webhooks/qonto/{connection_id}`` before routing.

    Webhooks skip routing and the other middlewares; every other request goes on to the
    application. (A connection that opens with a webhook is answered by
    :class:`relay.edge.guard.Guard` before it reaches ASGI; this serves the others.)
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(PREFIX):
            await self.app(scope, receive, send)
            return
        raw_id: str = scope["path"][len(PREFIX) :]
        if scope["method"] != "POST" or "/" in raw_id or not raw_id:
            status = 405 if scope["method"] != "POST" and raw_id and "/" not in raw_id else 404
            await _send(send, status, {"error": "not found" if status == 404 else "use POST"})
            return
        desk: Desk = scope["app"].state.intake
        content_length = signature_header = None
        for name, value in scope["headers"]:
            if name == b"content-length":
                content_length = value
            elif name == b"x-qonto-signature":
                signature_header = value.decode("latin-1")
        arrival = Arrival(desk, raw_id, content_length, signature_header)
        try:
            answer = await _answer(arrival, receive)
        except Exception:
            logger.exception("webhook_failed", connection=raw_id[:64])
            answer = UNAVAILABLE
        finally:
            arrival.release()
        arrival.record(answer)
        await _send(send, answer[0], answer[2])


async def _answer(arrival: Arrival, receive: Receive) -> Answer:
    if arrival.refusal is not None:
        return arrival.refusal  # decided by the head: the body is not read
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return DISCONNECTED
        if not arrival.feed(message.get("body", b"")):
            break
        if not message.get("more_body", False):
            break
    return arrival.settle() or await arrival.queue()


async def _send(send: Send, status: int, payload: Mapping[str, object]) -> None:
    body = orjson.dumps(payload)
    headers = [_JSON, (b"content-length", str(len(body)).encode())]
    if status == 503:
        headers.append(_RETRY)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


_JSON: Final = (b"content-type", b"application/json")
_RETRY: Final = (b"retry-after", b"5")
_STATUS_LINES: Final = {
    status.value: f"HTTP/1.1 {status.value} {status.phrase}\r\n".encode()
    for status in http.HTTPStatus
}


@functools.lru_cache(maxsize=2)
def _date_at(second: int) -> bytes:
    """Render the ``Date`` field of one second (once: the same second's answers reuse it)."""
    return f"date: {email.utils.formatdate(second, usegmt=True)}\r\n".encode()


def encode(answer: Answer, *, close: bool) -> bytes:
    """Render an answer as one complete HTTP/1.1 response (the guard writes it in one write)."""
    status, _, payload, _ = answer
    body = orjson.dumps(payload)
    return b"".join(
        (
            _STATUS_LINES[status],
            b"content-type: application/json\r\ncontent-length: %d\r\n" % len(body),
            _date_at(int(time.time())),
            b"retry-after: 5\r\n" if status == 503 else b"",
            b"connection: close\r\n" if close else b"",
            b"\r\n",
            body,
        )
    )
