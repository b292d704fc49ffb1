"""The webhook intake, which verifies Qonto's signature, queues the raw event durably and answers.

``POST /webhooks/qonto/{connection_id}`` answers 202 only after RabbitMQ confirmed the persistent
message; 404 for an unknown or stopped connection, 413 over 1 MiB, 401 for a bad or stale signature,
400 for a body that is not an event, 503 when the event could not be queued (Qonto then retries).
Read :class:`Arrival` (the decisions, whatever carries the webhook), then :class:`SecretCache` and
:class:`BodyBudget`; :class:`relay.edge.guard.Guard` and :class:`Intake` carry webhooks to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import email.utils
import http
import time
import uuid
from collections import OrderedDict
from collections.abc import Mapping
from typing import Final

import asyncpg
import orjson
from starlette.types import ASGIApp, Receive, Scope, Send

from relay import config, crypto, errors, log, retry, store
from relay.broker import amqp
from relay.domain import heartbeat
from relay.edge import metrics, signature
from relay.store import db

logger = log.get(__name__)

MAX_BODY: Final = 1024 * 1024
UNKNOWN_TTL_S: Final = 30.0
UNKNOWN_MAX: Final = 10_000
UNKNOWN_LOOKUPS_PER_S: Final = 10.0  # per worker, only while the cache's LISTEN is lost
RELOAD_WAIT_S: Final = 5.0  # how long a miss waits for a reload a NOTIFY asked for
REFRESH_S: Final = 60.0
# pauses between attempts to listen again after a lost LISTEN: from 1 s, never longer than 5 s
RELISTEN: Final = retry.Policy(first_s=1.0, cap_s=5.0, floor=0.5)
CHANNEL: Final = "relay_connections_changed"


class SecretCache:
    """Connection id → its currently valid webhook secrets (plaintext, in memory only).

    Loaded at start and refreshed on PostgreSQL ``NOTIFY relay_connections_changed`` (and every
    minute as a safety net), so a known connection's webhook never queries the database; while the
    cache listens, an unknown id costs no query either (the cache holds every connection that
    accepts webhooks). Only while its LISTEN is lost does an unknown id cost a lookup, at most
    ``UNKNOWN_LOOKUPS_PER_S`` per worker (503 beyond, and Qonto retries).
    """

    def __init__(self, settings: config.Settings, pool: asyncpg.Pool) -> None:
        self._settings = settings
        self._pool = pool
        self._box = crypto.Box(settings.secret_key.reveal())
        self._known: dict[uuid.UUID, tuple[str, ...]] = {}
        self._unknown: OrderedDict[uuid.UUID, float] = OrderedDict()
        self._pending: dict[uuid.UUID, asyncio.Future[tuple[str, ...]]] = {}
        self._listener: asyncpg.Connection | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._changed = asyncio.Event()
        self._reloaded = asyncio.Event()  # clear while a NOTIFY's reload is pending
        self._reloaded.set()
        self._tokens = UNKNOWN_LOOKUPS_PER_S
        self._tokens_at = time.monotonic()
        self.lookups = 0  # single-id lookups in PostgreSQL (unknown ids)
        self.reloads = 0  # full reloads
        self.listens = 0  # LISTEN connections opened

    async def start(self) -> None:
        """Listen first, then load, so that a change committed in between is not missed."""
        await self._listen()
        await self.reload()
        self._tasks.append(asyncio.create_task(self._refresher(), name="secret-cache-refresh"))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._listener is not None:
            with contextlib.suppress(Exception):
                await self._listener.close()

    async def reload(self) -> None:
        known: dict[uuid.UUID, list[str]] = {}
        for row in await store.webhook_secrets.intake_all(self._pool):
            known.setdefault(row.connection_id, []).append(self._box.open(row.secret))
        self._known = {k: tuple(v) for k, v in known.items()}
        self._unknown.clear()
        self.reloads += 1

    async def _listen(self) -> None:
        try:
            self._listener = await db.listen(self._settings, CHANNEL, self._notified, self._lost)
        except errors.DatabaseUnavailable:
            self._listener = None
            logger.warning("secret_cache_listen_failed")
            return
        self.listens += 1

    def _notified(self, *_: object) -> None:
        self._reloaded.clear()
        self._changed.set()

    def _lost(self, *_: object) -> None:
        self._listener = None
        self._changed.set()

    @property
    def complete(self) -> bool:
        """Whether the cache holds every connection that accepts webhooks.

        It does while it listens and no change it was told of is still to be loaded.
        """
        return self._listener is not None and self._reloaded.is_set()

    async def _refresher(self) -> None:
        """Reload on NOTIFY or every minute, and re-listen with backoff while the listener is lost.

        Whatever fails, the last known cache keeps serving.
        """
        backoff = retry.Backoff(RELISTEN)
        pause = RELISTEN.first_s
        while True:
            timeout = REFRESH_S if self._listener is not None else pause
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout=timeout)
            self._changed.clear()
            try:
                if self._listener is None:
                    await self._listen()
                await self.reload()
                self._reloaded.set()
            except Exception as exc:  # the cache must outlive any failure
                pause = backoff.next()
                logger.warning(
                    "secret_cache_reload_failed",
                    error=type(exc).__name__,
                    retry_in_s=round(pause, 2),
                )
                await asyncio.sleep(pause)
                self._changed.set()
            else:
                if self._listener is not None:
                    backoff.reset()
                else:  # still no listener: the next attempt waits longer (reloads keep the cache fresh)
                    pause = backoff.next()

    def at_once(self, connection_id: uuid.UUID) -> tuple[str, ...] | None:
        """Return the connection's secrets if the cache can tell without waiting, else None.

        Empty when the connection surely has none; None when only :meth:`secrets_for` can tell.
        """
        found = self._known.get(connection_id)
        if found is not None:
            return found
        if self.complete:
            return ()
        until = self._unknown.get(connection_id)
        return () if until is not None and until > time.monotonic() else None

    async def secrets_for(self, connection_id: uuid.UUID) -> tuple[str, ...]:
        """Return the connection's secrets, empty when it is unknown, disconnected or revoked.

        Raises ``errors.DatabaseUnavailable`` when the cache cannot tell (its LISTEN is lost and
        the lookups' rate is spent, or PostgreSQL does not answer).
        """
        found = self._known.get(connection_id)
        if found is not None:
            return found
        if self._listener is not None and not self._reloaded.is_set():
            # a change was notified and is being loaded: this id may be the new one
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._reloaded.wait(), timeout=RELOAD_WAIT_S)
            found = self._known.get(connection_id)
            if found is not None:
                return found
        if self.complete:
            return ()
        now = time.monotonic()
        until = self._unknown.get(connection_id)
        if until is not None and until > now:
            return ()
        # Concurrent requests for the same unknown id share one lookup.
        pending = self._pending.get(connection_id)
        if pending is None:
            if not self._spend_token(now):
                raise errors.DatabaseUnavailable(
                    "connection lookups rate-limited while not listening"
                )
            pending = asyncio.ensure_future(self._look_up(connection_id))
            self._pending[connection_id] = pending
            pending.add_done_callback(lambda _: self._pending.pop(connection_id, None))
        return await asyncio.shield(pending)

    def _spend_token(self, now: float) -> bool:
        self._tokens = min(
            UNKNOWN_LOOKUPS_PER_S, self._tokens + (now - self._tokens_at) * UNKNOWN_LOOKUPS_PER_S
        )
        self._tokens_at = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

    async def _look_up(self, connection_id: uuid.UUID) -> tuple[str, ...]:
        self.lookups += 1
        rows = await store.webhook_secrets.intake_one(self._pool, connection_id)
        if rows:
            value = tuple(self._box.open(row.secret) for row in rows)
            self._known[connection_id] = value
            return value
        self._unknown[connection_id] = time.monotonic() + UNKNOWN_TTL_S
        self._unknown.move_to_end(connection_id)
        while len(self._unknown) > UNKNOWN_MAX:
            self._unknown.popitem(last=False)
        return ()


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

    secrets: SecretCache
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
_date: list[object] = [0, b""]  # (second, its Date line), rendered once a second


def _date_line() -> bytes:
    now = int(time.time())
    if _date[0] != now:
        _date[0], _date[1] = now, f"date: {email.utils.formatdate(now, usegmt=True)}\r\n".encode()
    return _date[1]  # type: ignore[return-value]


def encode(answer: Answer, *, close: bool) -> bytes:
    """Render an answer as one complete HTTP/1.1 response (the guard writes it in one write)."""
    status, _, payload, _ = answer
    body = orjson.dumps(payload)
    return b"".join(
        (
            _STATUS_LINES[status],
            b"content-type: application/json\r\ncontent-length: %d\r\n" % len(body),
            _date_line(),
            b"retry-after: 5\r\n" if status == 503 else b"",
            b"connection: close\r\n" if close else b"",
            b"\r\n",
            body,
        )
    )
