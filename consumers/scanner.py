"""The daily scan, which lists from Qonto what webhooks cannot bring.

Qonto has no supplier-invoice topic and never replays a missed event. :func:`scan` walks each
connection's list endpoints (:func:`scan_connection`) and applies what it finds through
:mod:`relay.domain.ingest`, the same path webhooks take.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, Final

import asyncpg

from consumers import patience
from relay import config, crypto, errors, events, log, models, store
from relay.domain import connections, credentials, ingest
from relay.store import db
from relay.upstreams import qonto

logger = log.get(__name__)

OVERLAP: Final = dt.timedelta(minutes=10)
PAGE: Final = 100


@dataclasses.dataclass
class ConnectionScan:
    connection_id: uuid.UUID
    seen: dict[str, int] = dataclasses.field(default_factory=dict)
    new_documents: int = 0
    errors: list[str] = dataclasses.field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "connection_id": str(self.connection_id),
            "seen": self.seen,
            "new_documents": self.new_documents,
            "errors": self.errors,
        }


@dataclasses.dataclass
class ScanReport:
    connections: list[ConnectionScan] = dataclasses.field(default_factory=list)

    def for_connection(self, connection_id: uuid.UUID) -> ConnectionScan | None:
        return next((c for c in self.connections if c.connection_id == connection_id), None)

    def to_json(self) -> list[dict[str, Any]]:
        return [c.to_json() for c in self.connections]


async def _client_invoices(
    client: qonto.QontoClient, start: dt.datetime, end: dt.datetime
) -> AsyncIterator[dict[str, Any]]:
    """Walk unpaid and paid client invoices, re-reading one listed without ``attachment_id``."""
    async for item in client.client_invoices(start, end):
        if events.client_invoice_needs_fetch(item):
            try:
                item = await client.get_client_invoice(str(item["id"]))
            except errors.QontoNotFound:
                continue  # deleted between the list and the read
        yield item


Walker = Callable[[qonto.QontoClient, dt.datetime, dt.datetime], AsyncIterator[dict[str, Any]]]
SOURCES: Final[
    tuple[tuple[models.Source, str, Walker, Callable[[dict[str, Any]], events.Snapshot]], ...]
] = (
    (
        models.Source.SUPPLIER_INVOICE,
        "supplier_invoices_scanned_to",
        lambda c, a, b: c.supplier_invoices(a, b),
        events.supplier_invoice_snapshot,
    ),
    (
        models.Source.CLIENT_INVOICE,
        "client_invoices_scanned_to",
        _client_invoices,
        events.client_invoice_snapshot,
    ),
    (
        models.Source.TRANSACTION,
        "transactions_scanned_to",
        lambda c, a, b: c.transactions(a, b),
        events.transaction_snapshot,
    ),
)


async def _apply(
    pool: asyncpg.Pool,
    guard: patience.Guard | None,
    connection_id: uuid.UUID,
    snapshots: list[events.Snapshot],
) -> int:
    async def write() -> int:
        async with db.transaction(pool, "scan page") as conn:
            applied = await ingest.apply(conn, [(connection_id, s) for s in snapshots])
        return applied.created

    return await patience.run(guard, "scan page", write)


async def _advance(
    pool: asyncpg.Pool,
    guard: patience.Guard | None,
    connection_id: uuid.UUID,
    source: models.Source,
    now: dt.datetime,
) -> None:
    async def write() -> None:
        await store.connections.advance_watermark(pool, connection_id, source, now)

    await patience.run(guard, "advance watermark", write)


async def scan_connection(
    settings: config.Settings,
    pool: asyncpg.Pool,
    http: qonto.HttpClients,
    connection: models.Connection,
    *,
    since: dt.datetime | None,
    now: dt.datetime,
    guard: patience.Guard | None = None,
) -> ConnectionScan:
    """Walk each source of one connection from its watermark and apply what it lists.

    Per source (supplier invoices, client invoices, transactions with attachments), it walks the
    list endpoint for everything updated since the source's watermark, minus a 10-minute overlap
    that dedupe makes harmless, and applies each page in its own transaction. A source's
    watermark advances only when its whole walk succeeded; a failure leaves it for the next run
    and says so in the report.

    Advancing the watermark to the scan's start is safe only because a walk lists every item
    updated in its window even when items change while it runs (:mod:`relay.upstreams.qonto`
    walks by ``updated_at`` cursor, or re-walks until a pass is settled): whatever changes
    mid-walk gets a later ``updated_at`` and falls in the next window. A rotated OAuth token the
    walk could not store is stored at the end, or reported.
    """
    started = time.monotonic()
    result = ConnectionScan(connection.id)
    box = crypto.Box(settings.secret_key.reveal())
    qonto_creds, _ = await patience.run(
        guard, "load credentials", lambda: credentials.load(pool, box, connection.id)
    )

    async def store(creds: credentials.QontoCredentials) -> None:
        await patience.run(
            guard,
            "store credentials",
            lambda: credentials.store_qonto(pool, box, connection.id, creds),
        )

    client = qonto.client(settings, qonto_creds, http, on_tokens_rotated=store)
    for source, column, walk, to_snapshot in SOURCES:
        watermark = getattr(connection, column) or connection.scan_since
        start = (since or watermark) - OVERLAP
        seen = 0
        try:
            page: list[events.Snapshot] = []
            async for item in walk(client, start, now):
                seen += 1
                page.append(to_snapshot(item))
                if len(page) >= PAGE:
                    result.new_documents += await _apply(pool, guard, connection.id, page)
                    page = []
            if page:
                result.new_documents += await _apply(pool, guard, connection.id, page)
            await _advance(pool, guard, connection.id, source, now)
        except errors.OutageTooLong:
            raise  # the flush stops
        except errors.QontoAuthRejected as exc:
            reason = f"Qonto refused the credentials: reconnect the organization ({exc})"
            await patience.run(
                guard,
                "flag connection",
                functools.partial(
                    connections.flag,
                    pool,
                    connection.id,
                    models.ConnectionState.NEEDS_ATTENTION,
                    reason,
                    (models.Refuser.QONTO,),
                ),
            )
            result.errors.append(reason)
            logger.warning("scan_refused", connection=str(connection.id), reason=str(exc))
            break
        except errors.ConfigurationError as exc:
            result.errors.append(str(exc))
            logger.error("scan_misconfigured", connection=str(connection.id), reason=str(exc))
            break
        except (errors.Retryable, errors.QontoProtocolError) as exc:
            result.errors.append(f"{source}: {exc} (watermark kept, retried next run)")
            logger.warning(
                "scan_source_failed",
                connection=str(connection.id),
                source=str(source),
                reason=str(exc),
            )
        result.seen[str(source)] = seen
    if client.tokens_unsaved and not await client.save_tokens():
        result.errors.append(
            "the rotated Qonto refresh token could not be stored: "
            "reconnect the organization if the next run is refused"
        )
    logger.info(
        "scan_finished",
        connection=str(connection.id),
        seen=result.seen,
        new_documents=result.new_documents,
        errors=len(result.errors),
        duration_ms=round((time.monotonic() - started) * 1000),
    )
    return result


async def scan(
    settings: config.Settings,
    pool: asyncpg.Pool,
    http: qonto.HttpClients,
    *,
    connection_id: uuid.UUID | None = None,
    since: dt.datetime | None = None,
    now: dt.datetime | None = None,
    guard: patience.Guard | None = None,
) -> ScanReport:
    """Scan every active (or flagged) connection, or only ``connection_id``.

    Within a flush, ``guard`` is the flush's: every write (a page, a watermark, a rotated token)
    goes through it, so a PostgreSQL outage makes the walk wait for the database instead of
    dropping a page or a token (a page is one idempotent transaction, a watermark never moves
    back).
    """
    moment = now or dt.datetime.now(dt.UTC)
    report = ScanReport()
    for connection in await patience.run(
        guard, "list connections", lambda: connections.list_all(pool)
    ):
        if connection_id is not None and connection.id != connection_id:
            continue
        if connection.state not in (
            models.ConnectionState.ACTIVE,
            models.ConnectionState.NEEDS_ATTENTION,
        ):
            continue
        report.connections.append(
            await scan_connection(
                settings, pool, http, connection, since=since, now=moment, guard=guard
            )
        )
    return report
