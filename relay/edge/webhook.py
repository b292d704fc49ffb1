"""The webhook intake: verify Qonto's signature, queue the raw event durably, answer.

``POST /webhooks/qonto/{connection_id}`` answers 202 only after RabbitMQ confirmed the persistent
message; 404 for an unknown or stopped connection, 413 over 1 MiB, 401 for a bad or stale signature,
400 for a body that is not an event, 503 when the event could not be queued (Qonto then retries).

Secrets live in memory (:class:`SecretCache`), loaded at start and refreshed on PostgreSQL
``NOTIFY relay_connections_changed`` (and every minute as a safety net): a known connection's webhook
never queries the database, and while the cache listens an unknown id costs no query either (the
cache holds every connection that accepts webhooks). Only while its LISTEN is lost does an unknown id
cost a lookup, at most ``UNKNOWN_LOOKUPS_PER_S`` per worker (503 beyond: Qonto retries).

The bodies a worker holds at once are bounded (:class:`BodyBudget`, ``RELAY_BODY_BUFFER_BYTES``):
beyond, 503 before the body is read.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import OrderedDict
from typing import Final

import asyncpg
import orjson
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

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
    """Connection id → its currently valid webhook secrets (plaintext, in memory only)."""

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
        """Listen first, then load: a change committed in between is not missed."""
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
        """Whether the cache holds every connection that accepts webhooks (it listens, and no
        change it was told of is still to be loaded)."""
        return self._listener is not None and self._reloaded.is_set()

    async def _refresher(self) -> None:
        """Reload on NOTIFY, or every minute; re-listen with backoff while the listener is lost.

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
        """The connection's secrets; empty when it is unknown, disconnected or revoked.

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


def _answer(
    status: int, payload: dict[str, object], headers: dict[str, str] | None = None
) -> Response:
    return Response(
        orjson.dumps(payload), status_code=status, media_type="application/json", headers=headers
    )


class TooLarge(Exception):
    pass


class Busy(Exception):
    """The worker already holds as many body bytes as it may (RELAY_BODY_BUFFER_BYTES)."""


class BodyBudget:
    """The bytes of webhook bodies one worker may hold at once; a body takes its declared length
    before it is read (a chunked one, as it grows) and gives it back once read or refused."""

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


async def _read_body(request: Request, budget: BodyBudget) -> bytes:
    declared = request.headers.get("content-length")
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
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BODY:
                raise TooLarge
            if size > held:
                if not budget.take(size - held):
                    raise Busy
                held = size
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        budget.give(held)


async def receive(request: Request) -> Response:
    """The endpoint; a last-resort catch-all turns an unexpected error into a logged 503."""
    try:
        return await _receive(request)
    except Exception:
        logger.exception("webhook_failed", connection=request.path_params["connection_id"][:64])
        return _answer(503, {"error": "temporarily unavailable, retry later"}, {"Retry-After": "5"})


async def _receive(request: Request) -> Response:
    started = time.perf_counter()
    state = request.app.state
    cache: SecretCache = state.secrets
    publisher: amqp.Publisher = state.publisher
    stats: metrics.Metrics = state.metrics
    work: heartbeat.Work = state.work
    raw_id = request.path_params["connection_id"]

    def done(outcome: str, status: int, payload: dict[str, object], **context: object) -> Response:
        elapsed = time.perf_counter() - started
        stats.webhook(outcome, elapsed)
        if status == 202:
            work.add()
        event = "webhook_accepted" if status == 202 else "webhook_rejected"
        logger.info(
            event,
            connection=raw_id[:64],
            outcome=outcome,
            status=status,
            duration_ms=round(elapsed * 1000, 2),
            **context,
        )
        headers = {"Retry-After": "5"} if status == 503 else None
        return _answer(status, payload, headers)

    try:
        connection_id = uuid.UUID(raw_id)
    except ValueError:
        return done("unknown_connection", 404, {"error": "unknown connection"})
    try:
        secrets = await cache.secrets_for(connection_id)
    except errors.DatabaseUnavailable:
        return done("unavailable", 503, {"error": "temporarily unavailable, retry later"})
    if not secrets:
        return done("unknown_connection", 404, {"error": "unknown or disconnected connection"})
    try:
        body = await _read_body(request, state.bodies)
    except Busy:
        return done("busy", 503, {"error": "too many webhooks in flight, retry later"})
    except TooLarge:
        return done("too_large", 413, {"error": f"body larger than {MAX_BODY} bytes"})
    except ValueError:
        return done("bad_request", 400, {"error": "invalid Content-Length"})
    except ClientDisconnect:
        return done("client_disconnected", 400, {"error": "client disconnected"})
    try:
        signature.verify(request.headers.get("x-qonto-signature"), body, secrets, now=time.time())
    except signature.Rejected as exc:
        return done("bad_signature", 401, {"error": exc.reason})
    try:
        event = orjson.loads(body)
    except orjson.JSONDecodeError:
        return done("not_json", 400, {"error": "body is not JSON"})
    if (
        not isinstance(event, dict)
        or not isinstance(event.get("id"), str)
        or not event["id"]
        or len(event["id"]) > 200
        or not isinstance(event.get("type"), str)
    ):
        return done("not_an_event", 400, {"error": "not a Qonto event (needs string id and type)"})
    try:
        await publisher.publish_event(body, connection_id=str(connection_id), event_id=event["id"])
    except errors.BrokerUnavailable as exc:
        return done(
            "unavailable",
            503,
            {"error": "could not queue the event, retry later"},
            event_id=event["id"],
            reason=str(exc),
        )
    return done(
        "queued",
        202,
        {"status": "queued", "event_id": event["id"]},
        event_id=event["id"],
        topic=event["type"],
    )
