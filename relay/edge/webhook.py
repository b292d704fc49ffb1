"""The webhook intake, which verifies Qonto's signature, queues the raw event durably and answers.

``POST /webhooks/qonto/{connection_id}`` answers 202 only after RabbitMQ confirmed the persistent
message; 404 for an unknown or stopped connection, 413 over 1 MiB, 401 for a bad or stale signature,
400 for a body that is not an event, 503 when the event could not be queued (Qonto then retries).
Read :class:`Intake`, then :class:`SecretCache` and :class:`BodyBudget`.
"""

from __future__ import annotations

import asyncio
import contextlib
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
from relay.edge import signature
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


class TooLarge(Exception):
    pass


class Busy(Exception):
    """The worker already holds as many body bytes as it may (RELAY_BODY_BUFFER_BYTES)."""


class Disconnected(Exception):
    pass


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


async def _read_body(receive: Receive, declared: bytes | None, budget: BodyBudget) -> bytes:
    held = 0
    if declared is not None:
        if not (declared.isascii() and declared.isdigit()) or len(declared) > 12:
            raise ValueError("bad Content-Length")
        held = int(declared)
        if held > MAX_BODY:
            raise TooLarge
        if not budget.take(held):
            raise Busy
    try:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                raise Disconnected
            chunk = message.get("body", b"")
            if chunk:
                size += len(chunk)
                if size > MAX_BODY:
                    raise TooLarge
                if size > held:
                    if not budget.take(size - held):
                        raise Busy
                    held = size
                chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)
    finally:
        budget.give(held)


PREFIX: Final = "/webhooks/qonto/"
_JSON: Final = (b"content-type", b"application/json")
_RETRY: Final = (b"retry-after", b"5")
_UNAVAILABLE: Final = {"error": "temporarily unavailable, retry later"}


class Intake:
    """ASGI middleware that answers ``POST /webhooks/qonto/{connection_id}`` before routing.

    Webhooks skip routing and the other middlewares (the hot path, where one webhook costs as
    little as it can); every other request goes on to the application.
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
        started = time.perf_counter()
        try:
            status, outcome, payload, context = await _receive(scope, receive, raw_id)
        except Exception:
            logger.exception("webhook_failed", connection=raw_id[:64])
            status, outcome, payload, context = 503, "unavailable", _UNAVAILABLE, {}
        elapsed = time.perf_counter() - started
        state = scope["app"].state
        state.metrics.webhook(outcome, elapsed)
        if status == 202:
            state.work.add()
        log.fast(
            "webhook_accepted" if status == 202 else "webhook_rejected",
            connection=raw_id[:64],
            outcome=outcome,
            status=status,
            duration_ms=round(elapsed * 1000, 2),
            **context,
        )
        await _send(send, status, payload)


async def _send(send: Send, status: int, payload: Mapping[str, object]) -> None:
    body = orjson.dumps(payload)
    headers = [_JSON, (b"content-length", str(len(body)).encode())]
    if status == 503:
        headers.append(_RETRY)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


Answer = tuple[int, str, Mapping[str, object], dict[str, str]]


async def _receive(scope: Scope, receive: Receive, raw_id: str) -> Answer:
    """Decide the answer as (status, outcome, JSON payload, context for the log line)."""
    state = scope["app"].state
    cache: SecretCache = state.secrets
    try:
        connection_id = uuid.UUID(raw_id)
    except ValueError:
        return 404, "unknown_connection", {"error": "unknown connection"}, {}
    try:
        secrets = await cache.secrets_for(connection_id)
    except errors.DatabaseUnavailable:
        return 503, "unavailable", _UNAVAILABLE, {}
    if not secrets:
        return 404, "unknown_connection", {"error": "unknown or disconnected connection"}, {}
    declared = signature_header = None
    for name, value in scope["headers"]:
        if name == b"content-length":
            declared = value
        elif name == b"x-qonto-signature":
            signature_header = value.decode("latin-1")
    try:
        body = await _read_body(receive, declared, state.bodies)
    except Busy:
        return 503, "busy", {"error": "too many webhooks in flight, retry later"}, {}
    except TooLarge:
        return 413, "too_large", {"error": f"body larger than {MAX_BODY} bytes"}, {}
    except ValueError:
        return 400, "bad_request", {"error": "invalid Content-Length"}, {}
    except Disconnected:
        return 400, "client_disconnected", {"error": "client disconnected"}, {}
    try:
        signature.verify(signature_header, body, secrets, now=time.time())
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
        error = "not a Qonto event (needs string id and type)"
        return 400, "not_an_event", {"error": error}, {}
    event_id: str = event["id"]
    publisher: amqp.Publisher = state.publisher
    try:
        await publisher.publish_event(body, connection_id=str(connection_id), event_id=event_id)
    except errors.BrokerUnavailable as exc:
        error = "could not queue the event, retry later"
        return 503, "unavailable", {"error": error}, {"event_id": event_id, "reason": str(exc)}
    payload: dict[str, object] = {"status": "queued", "event_id": event_id}
    return 202, "queued", payload, {"event_id": event_id, "topic": str(event["type"])[:100]}
