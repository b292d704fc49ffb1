"""The daily scan (what webhooks cannot bring) and the scheduler (one run per day, missed days caught up)."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid

import asyncpg

from consumers import scanner, scheduler
from relay import config
from relay.domain import report
from relay.sandbox import files
from relay.sandbox import qonto as qonto_sandbox
from relay.store import db
from relay.upstreams import qonto
from tests.integration import factories


async def _scan(
    settings: config.Settings, pool: asyncpg.Pool, **kwargs: object
) -> scanner.ScanReport:
    async with qonto.http_clients(settings) as http:
        return await scanner.scan(settings, pool, http, **kwargs)  # type: ignore[arg-type]


async def test_the_scan_finds_what_no_webhook_announced(
    upstream_settings: config.Settings,
    pool: asyncpg.Pool,
    connection_id: uuid.UUID,
    qonto: qonto_sandbox.QontoSandbox,
) -> None:
    """Supplier invoices (any status), paid client invoices and transactions become documents."""
    supplier = qonto.add_supplier_invoice(
        attachment_id=qonto.add_attachment(
            files.pdf(seed=1), file_name="OVH.pdf", content_type="application/pdf"
        ),
        supplier_name="OVH SAS",
        total="71.88",
        status="awaiting_payment",
    )
    paid = qonto.add_client_invoice(
        attachment_id=qonto.add_attachment(
            files.pdf(seed=2), file_name="F-1.pdf", content_type="application/pdf"
        ),
        status="paid",
        total="100.00",
    )
    qonto.add_client_invoice(
        attachment_id=qonto.add_attachment(
            files.pdf(seed=3), file_name="F-2.pdf", content_type="application/pdf"
        ),
        status="draft",
        total="5.00",
    )
    tx, receipt = factories.receipt(qonto, seed=4)
    result = await _scan(upstream_settings, pool)
    rows = await pool.fetch(
        "SELECT source, direction, qonto_attachment_id, counterparty FROM documents ORDER BY id"
    )
    found = {(r["source"], r["direction"], r["qonto_attachment_id"]) for r in rows}
    assert found == {
        ("supplier_invoice", "PURCHASE", supplier["attachment_id"]),
        ("client_invoice", "SALE", paid["attachment_id"]),
        ("transaction", "PURCHASE", receipt),
    }
    assert result.connections[0].new_documents == 3
    assert result.connections[0].errors == []
    assert tx["id"]


async def test_watermarks_advance_and_overlap_is_harmless(
    upstream_settings: config.Settings,
    pool: asyncpg.Pool,
    connection_id: uuid.UUID,
    qonto: qonto_sandbox.QontoSandbox,
) -> None:
    """A second scan re-reads the overlap and creates nothing twice; watermarks move forward."""
    factories.receipt(qonto, seed=1)
    await _scan(upstream_settings, pool)
    first = await pool.fetchrow("SELECT * FROM connections")
    assert first["transactions_scanned_to"] is not None
    again = await _scan(upstream_settings, pool)
    assert again.connections[0].new_documents == 0
    assert await pool.fetchval("SELECT count(*) FROM documents") == 1
    second = await pool.fetchrow("SELECT * FROM connections")
    assert second["transactions_scanned_to"] > first["transactions_scanned_to"]


async def test_pagination_rate_limits_and_backfill(
    upstream_settings: config.Settings,
    pool: asyncpg.Pool,
    connection_id: uuid.UUID,
    qonto: qonto_sandbox.QontoSandbox,
) -> None:
    """250 supplier invoices over three pages, with 429s on the way, all found once."""
    for i in range(250):
        qonto.add_supplier_invoice(
            attachment_id=qonto.add_attachment(
                files.pdf(seed=i), file_name=f"{i}.pdf", content_type="application/pdf"
            ),
            supplier_name=f"Supplier {i}",
            total="1.00",
        )
    qonto.faults.fail_next("/v2/supplier_invoices", 429, count=2, retry_after=0.01)
    result = await _scan(
        upstream_settings, pool, since=dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    )
    assert result.connections[0].seen["supplier_invoice"] == 250
    assert (
        await pool.fetchval("SELECT count(*) FROM documents WHERE source = 'supplier_invoice'")
        == 250
    )
    assert qonto.faults.injected["429"] == 2


async def test_refused_credentials_flag_the_connection(
    upstream_settings: config.Settings,
    pool: asyncpg.Pool,
    connection_id: uuid.UUID,
    qonto: qonto_sandbox.QontoSandbox,
) -> None:
    """Qonto refusing the key: needs attention with an actionable reason; the watermark stays."""
    qonto.secret_key = "rotated-by-the-client"
    result = await _scan(upstream_settings, pool)
    state, reason, mark = await pool.fetchrow(
        "SELECT state, state_reason, supplier_invoices_scanned_to FROM connections"
    )
    assert state == "needs_attention"
    assert reason.startswith("Qonto refused the credentials")
    assert mark is None
    assert result.connections[0].errors


class Recorder:
    """A flush stand-in for scheduler tests: records calls (the real flush is tested elsewhere)."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(
        self, settings: config.Settings, pool: asyncpg.Pool, *, run_kind: str, run_id: int | None
    ) -> report.RunReport:
        self.calls += 1
        await asyncio.sleep(0.05)
        now = dt.datetime.now(dt.UTC)
        return report.RunReport(kind=run_kind, started_at=now, finished_at=now)


def test_slots_are_computed_in_utc() -> None:
    """Before 20:00 the latest slot is yesterday's; at or after, today's."""
    at = dt.time(20, 0)
    morning = dt.datetime(2026, 11, 24, 9, 0, tzinfo=dt.UTC)
    evening = dt.datetime(2026, 11, 24, 20, 0, tzinfo=dt.UTC)
    assert scheduler.latest_slot(morning, at) == dt.datetime(2026, 11, 23, 20, 0, tzinfo=dt.UTC)
    assert scheduler.latest_slot(evening, at) == evening
    assert scheduler.next_slot(morning, at) == dt.datetime(2026, 11, 24, 20, 0, tzinfo=dt.UTC)


async def test_two_schedulers_started_together_produce_one_run(
    upstream_settings: config.Settings, pool: asyncpg.Pool
) -> None:
    """Several replicas: the day is claimed once in PostgreSQL."""
    recorder = Recorder()
    now = dt.datetime(2026, 11, 24, 20, 0, 5, tzinfo=dt.UTC)
    async with db.pool_for(upstream_settings) as other:
        ran = await asyncio.gather(
            scheduler.run_due(upstream_settings, pool, now, flush=recorder),
            scheduler.run_due(upstream_settings, other, now, flush=recorder),
        )
        assert await scheduler.run_due(upstream_settings, other, now, flush=recorder) is False
    assert sorted(ran) == [False, True]
    assert recorder.calls == 1
    rows = await pool.fetch("SELECT scheduled_for, finished_at FROM runs WHERE kind = 'scheduled'")
    assert [r["scheduled_for"] for r in rows] == [dt.date(2026, 11, 24)]
    assert rows[0]["finished_at"] is not None


async def test_a_missed_day_runs_when_a_scheduler_starts(
    upstream_settings: config.Settings, pool: asyncpg.Pool
) -> None:
    """Every replica was down at 20:00: the next one to start runs that day at once, once."""
    recorder = Recorder()
    next_morning = dt.datetime(2026, 11, 25, 7, 30, tzinfo=dt.UTC)
    stop = asyncio.Event()
    task = asyncio.create_task(
        scheduler.run_forever(
            upstream_settings, pool, stop=stop, now=lambda: next_morning, flush=recorder
        )
    )
    await factories.until(lambda: recorder.calls == 1, what="the missed run")
    stop.set()
    await task
    day = await pool.fetchval("SELECT scheduled_for FROM runs WHERE kind = 'scheduled'")
    assert day == dt.date(2026, 11, 24)
    assert recorder.calls == 1


async def test_a_run_whose_scheduler_died_is_run_again(
    upstream_settings: config.Settings, pool: asyncpg.Pool
) -> None:
    """An unfinished run row with no scheduler holding the lock is resumed."""
    await pool.execute("INSERT INTO runs (kind, scheduled_for) VALUES ('scheduled', '2026-11-24')")
    recorder = Recorder()
    now = dt.datetime(2026, 11, 24, 21, 0, tzinfo=dt.UTC)
    assert await scheduler.run_due(upstream_settings, pool, now, flush=recorder) is True
    assert recorder.calls == 1
    assert await pool.fetchval("SELECT count(*) FROM runs WHERE finished_at IS NOT NULL") == 1


async def test_the_scheduled_run_scans_and_flushes_for_real(
    upstream_settings: config.Settings,
    pool: asyncpg.Pool,
    connection_id: uuid.UUID,
    qonto: qonto_sandbox.QontoSandbox,
) -> None:
    """Wired to the real flush: a supplier invoice only the scan can find reaches Loop."""
    qonto.add_supplier_invoice(
        attachment_id=qonto.add_attachment(
            files.pdf(seed=7), file_name="a.pdf", content_type="application/pdf"
        ),
        supplier_name="ACME",
        total="3.00",
    )
    now = dt.datetime.now(dt.UTC)
    assert await scheduler.run_due(upstream_settings, pool, now) is True
    assert await pool.fetchval("SELECT state FROM documents") == "uploaded"
    stored = await pool.fetchval(
        "SELECT report->'totals'->>'uploaded' FROM runs WHERE kind = 'scheduled'"
    )
    assert stored == "1"
