"""Batches of Qonto events from RabbitMQ turned into committed rows, then each message settled.

A batch (gathered by :mod:`consumers.consume`) is applied in one transaction and acknowledged only
after the commit: a crash redelivers what was not acknowledged, and the events table's key
(connection, Qonto event id) makes it a no-op. :meth:`Buffer._settle` decides each message's fate.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import time
import uuid
from collections.abc import Sequence

import aio_pika
import aio_pika.abc
import asyncpg

from relay import config, crypto, errors, events, log, models, store
from relay.broker import amqp
from relay.domain import credentials, ingest
from relay.store import db
from relay.upstreams import qonto

logger = log.get(__name__)


@dataclasses.dataclass
class Item:
    """One event of a batch, with the message that brought it (acknowledged for it)."""

    message: aio_pika.abc.AbstractIncomingMessage
    piece: amqp.Piece  # the event, read from its message (several may share one)
    connection_id: uuid.UUID | None = None
    event: events.Event | None = None
    snapshot: events.Snapshot | None = None
    outcome: str = "applied"
    dead: str | None = None  # reason to dead-letter
    retry: str | None = None  # reason to retry later


def _attempts(item: Item) -> int:
    value = item.piece.headers.get(amqp.HEADER_ATTEMPTS, 0)
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
        raw = item.piece.headers.get(amqp.HEADER_CONNECTION)
        try:
            item.connection_id = uuid.UUID(str(raw))
        except ValueError:
            item.dead = "message without a valid x-connection-id header"
            return
        try:
            item.event = events.parse(item.piece.body)
        except errors.InvalidEvent as exc:
            item.dead = str(exc)

    async def _fetch_invoices(self, items: list[Item]) -> None:
        """Re-fetch from Qonto the invoice of client invoice events without ``attachment_id``."""
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
                fetched = events.scrub(await client.get_client_invoice(str(event.data["id"])))
                item.event = dataclasses.replace(event, data={**event.data, **fetched})
            except errors.QontoNotFound:
                item.outcome = "invoice_not_found"
            except errors.NotFound:
                item.dead = "unknown connection"
            except errors.DatabaseUnavailable:
                raise  # the whole batch waits for PostgreSQL (see Buffer._settle)
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

    async def _apply(self, items: list[Item], *, what: str = "apply batch") -> None:
        """Apply the live items in one transaction.

        Their connections are checked, their events recorded (a duplicate once), their snapshots
        turned into documents and their outcomes saved.
        """
        live = [i for i in items if not i.dead and not i.retry]
        if not live:
            return
        async with db.transaction(self._pool, what) as conn:
            live = _drop_repeats(await _check_connections(conn, live))
            if not live:
                return
            fresh = await _record_events(conn, live)
            snapshots = []
            for item in fresh:
                snapshot = await _take_snapshot(conn, item)
                if snapshot is not None:
                    snapshots.append(snapshot)
            applied = await ingest.apply(conn, snapshots)
            _judge_snapshots(fresh, snapshots, applied)
            await _save_outcomes(conn, [i for i in fresh if i.outcome != "applied"])

    async def _apply_each(self, items: list[Item], reason: str) -> None:
        """Apply each message in a transaction of its own, after PostgreSQL refused the batch.

        The messages it still refuses are dead-lettered with its reason.

        Only InvalidData (the data's fault) is isolated: a schema or configuration error would fail
        every message alike, so it propagates and stops the consumer instead of dead-lettering all.
        PostgreSQL becoming unavailable propagates too: the batch is applied again later, and the
        messages already committed are then duplicates.
        """
        live = [i for i in items if not i.dead and not i.retry]
        logger.warning("batch_isolating", size=len(live), reason=reason)
        for item in live:
            before = item.outcome
            try:
                await self._apply([item], what="apply event")
            except errors.InvalidData as exc:
                item.outcome, item.snapshot, item.dead = before, None, str(exc)

    # ------------------------------------------------------------------ settle (after the commit)

    async def _dead_letter(self, item: Item, reason: str) -> None:
        now = dt.datetime.now(dt.UTC).isoformat()
        headers = {
            **item.piece.headers,
            amqp.HEADER_REASON: reason[:500],
            amqp.HEADER_FAILED_AT: now,
            amqp.HEADER_FIRST_FAILED_AT: item.piece.headers.get(amqp.HEADER_FIRST_FAILED_AT, now),
            amqp.HEADER_DLQ_ID: str(uuid.uuid4()),
        }
        await self._publisher.publish(
            self._settings.dead_letter_queue,
            item.piece.body,
            message_id=item.piece.message_id,
            headers=headers,
        )
        logger.warning("event_dead_lettered", reason=reason, event_id=item.piece.message_id)

    async def _settle_all(self, items: list[Item]) -> None:
        """Publish dead letters and retries (confirmed), then acknowledge the whole batch at once.

        One acknowledgement of the last message covers the batch, since every message before it
        was settled already.
        """
        await asyncio.gather(
            *(self._settle(i) for i in items if i.dead is not None or i.retry is not None)
        )
        with amqp.translate("ack"):
            await items[-1].message.ack(multiple=True)

    async def _settle(self, item: Item) -> None:
        """Decide a message's fate, in this one place (the acknowledgement follows in _settle_all).

        - not an event, unknown topic version, unknown connection, Qonto refusing the credentials
          → dead-letter queue at once, with the reason (an operator replays it after a fix);
        - transient for one message (Qonto unavailable while a client invoice is fetched) → the
          delay queue for its attempt (1 s, 5 s, 30 s, 2 min, 10 min), then the dead-letter
          queue; never a hot loop;
        - everything else → applied and acknowledged.

        Two failures never reach it: PostgreSQL unavailable makes :meth:`process` raise
        ``errors.DatabaseUnavailable`` and settle nothing (the consumer keeps the batch in hand
        and applies it again once PostgreSQL answers: the retries above would burn out during a
        long outage and dead-letter good events); PostgreSQL refusing a record
        (``errors.InvalidData``) rolls the batch back and applies its messages one by one
        (:meth:`_apply_each`), so that only the culprit is dead-lettered.
        """
        if item.dead is not None:
            await self._dead_letter(item, item.dead)
        elif item.retry is not None:
            attempt = _attempts(item) + 1
            if attempt > len(self._retry_delays):
                item.dead = f"still failing after {attempt - 1} retries: {item.retry}"
                await self._dead_letter(item, item.dead)
            else:
                delay = self._retry_delays[attempt - 1]
                headers = {
                    **item.piece.headers,
                    amqp.HEADER_ATTEMPTS: attempt,
                    amqp.HEADER_REASON: item.retry[:500],
                    amqp.HEADER_FIRST_FAILED_AT: item.piece.headers.get(
                        amqp.HEADER_FIRST_FAILED_AT, dt.datetime.now(dt.UTC).isoformat()
                    ),
                }
                await self._publisher.publish(
                    amqp.retry_queue_name(self._settings, delay),
                    item.piece.body,
                    message_id=item.piece.message_id,
                    headers=headers,
                )
                logger.info(
                    "event_retried",
                    attempt=attempt,
                    delay_s=delay,
                    reason=item.retry,
                    event_id=item.piece.message_id,
                )

    async def process(self, messages: list[aio_pika.abc.AbstractIncomingMessage]) -> dict[str, int]:
        """Apply the batch, then settle every message and return the count of each outcome.

        Raises ``errors.DatabaseUnavailable`` with nothing settled (the caller keeps the batch and
        calls again once PostgreSQL answers), and ``errors.BrokerUnavailable`` when RabbitMQ failed
        to take a settlement (the caller gives up its channel: the broker delivers the batch again).
        """
        started = time.perf_counter()
        items = [
            Item(message, piece)
            for message in messages
            for piece in amqp.split(message.body, message.headers or {}, message.message_id)
        ]
        for item in items:
            self._parse(item)
        await self._fetch_invoices(items)
        applying = time.perf_counter()
        # what _apply may change in an item, restored when its transaction is rolled back
        before = [(i.outcome, i.dead) for i in items]
        try:
            await self._apply(items)
        except errors.InvalidData as exc:  # a record's fault (not the schema's, not the settings')
            for item, (outcome, dead) in zip(items, before, strict=True):
                item.outcome, item.dead, item.snapshot = outcome, dead, None
            await self._apply_each(items, str(exc))
        settling = time.perf_counter()
        await self._settle_all(items)
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


# ---------------------------------------------------------------------- the steps of Buffer._apply

Key = tuple[uuid.UUID, str, str]  # (connection, source, resource id)


async def _check_connections(conn: db.Conn, live: list[Item]) -> list[Item]:
    """Mark each item whose connection is unknown or inactive, or whose topic is ignored.

    Unknown ones are dead-lettered; the others are recorded with nothing applied. Returns the items
    still to record.
    """
    ids = list({i.connection_id for i in live if i.connection_id is not None})
    states = await store.connections.states(conn, ids)
    for item in live:
        state = None if item.connection_id is None else states.get(item.connection_id)
        if state is None:
            item.dead = "unknown connection"
        elif state in ("revoked", "disconnected"):
            item.outcome = "connection_inactive"
        elif item.event is not None and item.event.kind is events.Kind.IGNORED:
            item.outcome = "ignored_topic"
    return [i for i in live if not i.dead]


def _drop_repeats(live: list[Item]) -> list[Item]:
    """Mark every repeat of an event id within the batch a duplicate, and return the items left.

    A copy after the first is a duplicate, as it would be in a later batch.
    """
    seen: set[tuple[uuid.UUID | None, str]] = set()
    for item in live:
        event_key = (item.connection_id, item.event.id if item.event else "")
        if event_key in seen:
            item.outcome = "duplicate"
        seen.add(event_key)
    return [i for i in live if i.outcome != "duplicate"]


async def _record_events(conn: db.Conn, live: list[Item]) -> list[Item]:
    """Insert the items' events and return the fresh items.

    The ones already recorded are duplicates.
    """
    new = await store.events.insert(
        conn,
        [
            store.events.NewEvent(
                i.connection_id,
                i.event.id,
                i.event.topic,
                i.outcome,
                i.event.created_at,
                events.payload_text(i.piece.body),
            )
            for i in live
            if i.event is not None and i.connection_id is not None
        ],
    )
    fresh = [i for i in live if i.event and (i.connection_id, i.event.id) in new]
    for item in live:
        if item not in fresh:
            item.outcome = "duplicate"
    return fresh


async def _take_snapshot(conn: db.Conn, item: Item) -> tuple[uuid.UUID, events.Snapshot] | None:
    """Return the resource snapshot an applied event carries, also kept on the item.

    Transactions and client invoices carry one; a consent revocation revokes its connection
    instead.
    """
    event = item.event
    if item.outcome != "applied" or event is None or item.connection_id is None:
        return None
    if event.kind is events.Kind.TRANSACTION:
        item.snapshot = events.transaction_snapshot(event.data, fallback=event.created_at)
    elif event.kind is events.Kind.CLIENT_INVOICE:
        item.snapshot = events.client_invoice_snapshot(event.data, fallback=event.created_at)
    elif event.kind is events.Kind.CONSENT_REVOCATION:
        revoked_at = event.data.get("revoked_at") or "now"
        await store.connections.revoke(
            conn,
            item.connection_id,
            f"consent revoked in Qonto at {revoked_at}: reconnect with new credentials",
        )
        item.outcome = "revoked"
    if item.snapshot is None:
        return None
    return item.connection_id, item.snapshot


def _newest(snapshots: list[tuple[uuid.UUID, events.Snapshot]]) -> dict[Key, dt.datetime]:
    """Find each resource's newest ``updated_at`` among the batch's snapshots."""
    newest: dict[Key, dt.datetime] = {}
    for cid, snap in snapshots:
        key = (cid, str(snap.source), snap.resource_id)
        if snap.updated_at and (key not in newest or snap.updated_at > newest[key]):
            newest[key] = snap.updated_at
    return newest


def _judge_snapshots(
    fresh: list[Item],
    snapshots: list[tuple[uuid.UUID, events.Snapshot]],
    applied: ingest.Applied,
) -> None:
    """Mark each fresh item whose snapshot is stale, or that is a client invoice without a document.

    A snapshot is stale when it was older than the one recorded or than another of the batch; a
    client invoice without a document is a draft or a canceled one.
    """
    newest = _newest(snapshots)
    for item in fresh:
        if item.snapshot is None or item.connection_id is None:
            continue
        key = (item.connection_id, str(item.snapshot.source), item.snapshot.resource_id)
        when = item.snapshot.updated_at
        superseded = when is not None and key in newest and when < newest[key]
        if key in applied.stale or superseded:
            item.outcome = ingest.STALE
        elif item.snapshot.source is models.Source.CLIENT_INVOICE and not item.snapshot.documents:
            item.outcome = ingest.NOT_A_DOCUMENT


async def _save_outcomes(conn: db.Conn, changed: list[Item]) -> None:
    """Record on their events the outcomes that are not "applied"."""
    if changed:
        await store.events.set_outcomes(
            conn,
            [
                (i.connection_id, i.event.id, i.outcome)
                for i in changed
                if i.event is not None and i.connection_id is not None
            ],
        )
