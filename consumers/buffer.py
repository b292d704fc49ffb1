"""`relay consume`: Qonto events from RabbitMQ into the PostgreSQL buffer, in batches.

Messages are gathered into batches (up to ``batch_size`` or ``batch_window_s``) and applied in ONE
transaction; the batch is acknowledged only after the commit. A crash at any point redelivers
unacknowledged messages, and the events table's key (connection, Qonto event id) makes them no-ops.

What happens to each message is decided in one place, :func:`_settle`, from the error class:
- not an event, unknown topic version, unknown connection, Qonto refusing the credentials
  → dead-letter queue at once, with the reason (an operator replays it after a fix);
- transient (database or Qonto unavailable) → the delay queue for its attempt (1 s, 5 s, 30 s,
  2 min, 10 min), then the dead-letter queue; never a hot loop;
- everything else → applied and acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import time
import uuid
from collections.abc import Sequence
from typing import Any

import aio_pika
import aio_pika.abc
import asyncpg

from relay import (
    amqp,
    config,
    credentials,
    crypto,
    db,
    errors,
    events,
    ingest,
    log,
    models,
    qonto,
    queries,
)

logger = log.get(__name__)


@dataclasses.dataclass
class Item:
    message: aio_pika.abc.AbstractIncomingMessage
    connection_id: uuid.UUID | None = None
    event: events.Event | None = None
    snapshot: events.Snapshot | None = None
    outcome: str = "applied"
    dead: str | None = None  # reason to dead-letter
    retry: str | None = None  # reason to retry later


def _headers(message: aio_pika.abc.AbstractIncomingMessage) -> dict[str, Any]:
    return dict(message.headers or {})


def _attempts(message: aio_pika.abc.AbstractIncomingMessage) -> int:
    value = _headers(message).get(amqp.HEADER_ATTEMPTS, 0)
    return int(value) if isinstance(value, int) else 0


class Buffer:
    """Turns batches of messages into committed rows, then settles each message."""

    def __init__(
        self,
        settings: config.Settings,
        pool: asyncpg.Pool,
        publisher: amqp.Publisher,
        http: qonto.HttpClients,
        *,
        retry_delays: Sequence[int] = amqp.RETRY_DELAYS_S,
    ) -> None:
        unknown = sorted(set(retry_delays) - set(amqp.RETRY_DELAYS_S))
        if not retry_delays or unknown:
            raise errors.ConfigurationError(
                f"retry delays must be among the declared delay queues {amqp.RETRY_DELAYS_S}"
            )
        self._retry_delays = tuple(retry_delays)
        self._settings = settings
        self._pool = pool
        self._publisher = publisher
        self._http = http
        self._box = crypto.Box(settings.secret_key.reveal())

    # ------------------------------------------------------------------ parse (outside the transaction)

    def _parse(self, item: Item) -> None:
        raw = _headers(item.message).get(amqp.HEADER_CONNECTION)
        try:
            item.connection_id = uuid.UUID(str(raw))
        except ValueError:
            item.dead = "message without a valid x-connection-id header"
            return
        try:
            item.event = events.parse(item.message.body)
        except errors.InvalidEvent as exc:
            item.dead = str(exc)

    async def _fetch_invoices(self, items: list[Item]) -> None:
        """Client invoice events without ``attachment_id``: re-fetch the invoice from Qonto."""
        clients: dict[uuid.UUID, qonto.QontoClient] = {}
        for item in items:
            event = item.event
            if item.dead or event is None or event.kind is not events.Kind.CLIENT_INVOICE:
                continue
            if not events.client_invoice_needs_fetch(event.data):
                continue
            assert item.connection_id is not None
            try:
                client = clients.get(item.connection_id)
                if client is None:
                    client = clients[item.connection_id] = await self._client(item.connection_id)
                fetched = await client.get_client_invoice(str(event.data["id"]))
                item.event = dataclasses.replace(event, data={**event.data, **fetched})
            except errors.QontoNotFound:
                item.outcome = "invoice_not_found"
            except errors.NotFound:
                item.dead = "unknown connection"
            except (
                errors.QontoAuthRejected,
                errors.ConfigurationError,
                errors.QontoProtocolError,
            ) as exc:
                item.dead = f"client invoice could not be fetched: {exc}"
            except errors.Retryable as exc:
                item.retry = str(exc)

    async def _client(self, connection_id: uuid.UUID) -> qonto.QontoClient:
        qonto_creds, _ = await credentials.load(self._pool, self._box, connection_id)

        async def store(creds: credentials.QontoCredentials) -> None:
            await credentials.store_qonto(self._pool, self._box, connection_id, creds)

        return qonto.client(self._settings, qonto_creds, self._http, on_tokens_rotated=store)

    # ------------------------------------------------------------------ apply (one transaction)

    async def _apply(self, items: list[Item]) -> None:
        live = [i for i in items if not i.dead and not i.retry]
        if not live:
            return
        ids = list({i.connection_id for i in live if i.connection_id is not None})
        with db.translate("apply batch"):
            async with self._pool.acquire() as conn, conn.transaction():
                states = {
                    r["id"]: r["state"]
                    for r in await conn.fetch(queries.get("connection_states"), ids)
                }
                for item in live:
                    state = states.get(item.connection_id)
                    if state is None:
                        item.dead = "unknown connection"
                    elif state in ("revoked", "disconnected"):
                        item.outcome = "connection_inactive"
                    elif item.event is not None and item.event.kind is events.Kind.IGNORED:
                        item.outcome = "ignored_topic"
                live = [i for i in live if not i.dead]
                if not live:
                    return
                inserted = await conn.fetch(
                    queries.get("insert_events"),
                    [i.connection_id for i in live],
                    [i.event.id for i in live if i.event],
                    [i.event.topic for i in live if i.event],
                    [i.outcome for i in live],
                    [i.event.created_at for i in live if i.event],
                    [i.message.body.decode("utf-8", "replace") for i in live],
                )
                new = {(r["connection_id"], r["event_id"]) for r in inserted}
                fresh = [i for i in live if i.event and (i.connection_id, i.event.id) in new]
                for item in live:
                    if item not in fresh:
                        item.outcome = "duplicate"
                snapshots: list[tuple[uuid.UUID, events.Snapshot]] = []
                for item in fresh:
                    if (
                        item.outcome != "applied"
                        or item.event is None
                        or item.connection_id is None
                    ):
                        continue
                    event = item.event
                    if event.kind is events.Kind.TRANSACTION:
                        item.snapshot = events.transaction_snapshot(
                            event.data, fallback=event.created_at
                        )
                    elif event.kind is events.Kind.CLIENT_INVOICE:
                        item.snapshot = events.client_invoice_snapshot(
                            event.data, fallback=event.created_at
                        )
                    elif event.kind is events.Kind.CONSENT_REVOCATION:
                        revoked_at = event.data.get("revoked_at") or "now"
                        await conn.execute(
                            queries.get("revoke_connection"),
                            item.connection_id,
                            f"consent revoked in Qonto at {revoked_at}: reconnect with new credentials",
                        )
                        item.outcome = "revoked"
                    if item.snapshot is not None:
                        snapshots.append((item.connection_id, item.snapshot))
                applied = await ingest.apply(conn, snapshots)
                newest: dict[tuple[uuid.UUID, str, str], dt.datetime] = {}
                for cid, snap in snapshots:
                    key = (cid, str(snap.source), snap.resource_id)
                    if snap.updated_at and (key not in newest or snap.updated_at > newest[key]):
                        newest[key] = snap.updated_at
                changed = []
                for item in fresh:
                    if item.snapshot is not None and item.connection_id is not None:
                        key = (
                            item.connection_id,
                            str(item.snapshot.source),
                            item.snapshot.resource_id,
                        )
                        when = item.snapshot.updated_at
                        superseded = when is not None and key in newest and when < newest[key]
                        if key in applied.stale or superseded:
                            item.outcome = ingest.STALE
                        elif item.snapshot.source is models.Source.CLIENT_INVOICE and not (
                            item.snapshot.documents
                        ):
                            item.outcome = ingest.NOT_A_DOCUMENT  # a draft or canceled one
                    if item.outcome != "applied":
                        changed.append(item)
                if changed:
                    await conn.execute(
                        queries.get("set_event_outcomes"),
                        [i.connection_id for i in changed],
                        [i.event.id for i in changed if i.event],
                        [i.outcome for i in changed],
                    )

    # ------------------------------------------------------------------ settle (after the commit)

    async def _dead_letter(self, item: Item, reason: str) -> None:
        headers = {
            **_headers(item.message),
            amqp.HEADER_REASON: reason[:500],
            amqp.HEADER_FAILED_AT: dt.datetime.now(dt.UTC).isoformat(),
            amqp.HEADER_DLQ_ID: str(uuid.uuid4()),
        }
        await self._publisher.publish(
            self._settings.dead_letter_queue,
            item.message.body,
            message_id=item.message.message_id,
            headers=headers,
        )
        logger.warning("event_dead_lettered", reason=reason, event_id=item.message.message_id)

    async def _settle_all(self, items: list[Item]) -> None:
        """Dead letters and retries are published (confirmed) first, then the whole batch is
        acknowledged at once: every message before the batch's last one was settled already."""
        await asyncio.gather(
            *(self._settle(i) for i in items if i.dead is not None or i.retry is not None)
        )
        with amqp.translate("ack"):
            await items[-1].message.ack(multiple=True)

    async def _settle(self, item: Item) -> None:
        """The one place a message's fate is decided (the acknowledgement follows in _settle_all)."""
        if item.dead is not None:
            await self._dead_letter(item, item.dead)
        elif item.retry is not None:
            attempt = _attempts(item.message) + 1
            if attempt > len(self._retry_delays):
                item.dead = f"still failing after {attempt - 1} retries: {item.retry}"
                await self._dead_letter(item, item.dead)
            else:
                delay = self._retry_delays[attempt - 1]
                headers = {
                    **_headers(item.message),
                    amqp.HEADER_ATTEMPTS: attempt,
                    amqp.HEADER_REASON: item.retry[:500],
                }
                await self._publisher.publish(
                    amqp.retry_queue_name(self._settings, delay),
                    item.message.body,
                    message_id=item.message.message_id,
                    headers=headers,
                )
                logger.info(
                    "event_retried",
                    attempt=attempt,
                    delay_s=delay,
                    reason=item.retry,
                    event_id=item.message.message_id,
                )

    async def process(self, messages: list[aio_pika.abc.AbstractIncomingMessage]) -> dict[str, int]:
        started = time.perf_counter()
        items = [Item(m) for m in messages]
        for item in items:
            self._parse(item)
        await self._fetch_invoices(items)
        applying = time.perf_counter()
        try:
            await self._apply(items)
        except errors.DatabaseUnavailable as exc:
            for item in items:
                if item.dead is None:
                    item.retry = str(exc)
        settling = time.perf_counter()
        try:
            await self._settle_all(items)
        except errors.BrokerUnavailable:
            for item in items:
                with contextlib.suppress(Exception):
                    await item.message.nack(requeue=True)
            raise
        counts: dict[str, int] = {}
        for item in items:
            key = "dead_lettered" if item.dead else "retried" if item.retry else item.outcome
            counts[key] = counts.get(key, 0) + 1
        done = time.perf_counter()
        logger.info(
            "batch_committed",
            size=len(items),
            duration_ms=round((done - started) * 1000, 1),
            apply_ms=round((settling - applying) * 1000, 1),
            settle_ms=round((done - settling) * 1000, 1),
            **counts,
        )
        return counts


async def consume(
    settings: config.Settings,
    *,
    stop: asyncio.Event | None = None,
    prefetch: int = 1024,
    batch_size: int = 256,
    batch_window_s: float = 0.02,
    retry_delays: Sequence[int] = amqp.RETRY_DELAYS_S,
) -> None:
    """Run until ``stop`` is set; the current batch is committed and acknowledged before leaving.

    ``retry_delays`` (seconds, each one of the declared delay queues) is the wait before each retry
    of a message failing transiently; after the last one it is dead-lettered. Tests shorten it.
    """
    stop = stop or asyncio.Event()
    async with (
        db.pool_for(settings, min_size=1, max_size=2) as pool,
        amqp.connection(settings, name="relay-consume") as conn,
        qonto.http_clients(settings) as http,
    ):
        with amqp.translate("consumer channel"):
            channel = await conn.channel()
            await amqp.declare(channel, settings)
            await channel.set_qos(prefetch_count=prefetch)
            queue = await channel.get_queue(settings.events_queue, ensure=False)
        publisher = await amqp.Publisher.open(conn, settings)
        buffer = Buffer(settings, pool, publisher, http, retry_delays=retry_delays)
        inbox: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage] = asyncio.Queue()
        tag = await queue.consume(inbox.put)
        logger.info("consume_started", queue=settings.events_queue)
        backoff = 1.0
        processed = 0
        try:
            while not stop.is_set():
                batch = await _gather(inbox, stop, batch_size, batch_window_s)
                if not batch:
                    continue
                try:
                    counts = await buffer.process(batch)
                    processed += sum(counts.values())
                    backoff = 1.0
                except errors.BrokerUnavailable as exc:
                    logger.warning("consume_broker_unavailable", reason=str(exc), pause_s=backoff)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), timeout=backoff)
                    backoff = min(backoff * 2, 60.0)
        finally:
            with contextlib.suppress(Exception):
                await queue.cancel(tag)
            while not inbox.empty():  # delivered but not processed: back to the queue
                with contextlib.suppress(Exception):
                    await inbox.get_nowait().nack(requeue=True)
            await publisher.close()
            logger.info("consume_stopped", processed=processed)


async def _gather(
    inbox: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage],
    stop: asyncio.Event,
    size: int,
    window: float,
) -> list[aio_pika.abc.AbstractIncomingMessage]:
    stopping = asyncio.ensure_future(stop.wait())
    getting = asyncio.ensure_future(inbox.get())
    try:
        await asyncio.wait({stopping, getting}, timeout=1.0, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
    if not getting.done():
        getting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await getting
        return []
    batch = [getting.result()]
    deadline = time.monotonic() + window
    while len(batch) < size:
        try:
            batch.append(inbox.get_nowait())
            continue
        except asyncio.QueueEmpty:
            pass
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            batch.append(await asyncio.wait_for(inbox.get(), timeout=remaining))
        except TimeoutError:
            break
    return batch
