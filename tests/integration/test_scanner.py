"""The daily scan against the Qonto sandbox (real sockets) and the real PostgreSQL.

Complements tests/integration/test_scan_and_schedule.py (what only the scan finds, watermarks and
overlap, 250 supplier invoices with 429s, refused credentials).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid

import asyncpg
import pytest

from consumers import scanner
from relay import config, crypto
from relay.domain import connections, credentials, inputs
from relay.sandbox import files
from relay.sandbox import qonto as qonto_sandbox
from relay.upstreams import listing
from relay.upstreams import qonto as qonto_api  # `qonto` is the sandbox fixture here
from tests.integration import factories


async def _scan(
    settings: config.Settings,
    pool: asyncpg.Pool,
    *,
    connection_id: uuid.UUID | None = None,
    since: dt.datetime | None = None,
) -> scanner.ScanReport:
    async with qonto_api.http_clients(settings) as http:
        return await scanner.scan(settings, pool, http, connection_id=connection_id, since=since)


def _supplier_invoice(sandbox: qonto_sandbox.QontoSandbox, seed: int) -> dict[str, object]:
    return sandbox.add_supplier_invoice(
        attachment_id=sandbox.add_attachment(
            files.pdf(seed=seed), file_name=f"{seed}.pdf", content_type="application/pdf"
        ),
        supplier_name=f"Supplier {seed}",
        total="12.00",
    )


async def test_more_than_a_page_of_transactions_is_walked_through_a_503(
    upstream_settings: config.Settings,
    pool: asyncpg.Pool,
    connection_id: uuid.UUID,
    qonto: qonto_sandbox.QontoSandbox,
) -> None:
    """130 transactions with receipts (two pages) and one 503 on the way: 130 pending documents."""
    for seed in range(130):
        factories.receipt(qonto, seed=seed)
    qonto.faults.fail_next("/v2/transactions", 503, count=1)
    result = await _scan(upstream_settings, pool)
    assert result.connections[0].errors == []
    assert result.connections[0].seen["transaction"] == 130
    assert result.connections[0].new_documents == 130
    assert qonto.faults.injected["503"] == 1
    counts = await pool.fetchrow(
        "SELECT count(*) AS n, count(*) FILTER (WHERE state = 'pending') AS pending FROM documents"
    )
    assert counts is not None
    assert (counts["n"], counts["pending"]) == (130, 130)


async def test_a_source_still_unavailable_keeps_its_watermark_while_the_others_advance(
    upstream_settings: config.Settings,
    pool: asyncpg.Pool,
    connection_id: uuid.UUID,
    qonto: qonto_sandbox.QontoSandbox,
) -> None:
    """Client invoices rate-limited past every retry: reported, their watermark stays unset."""
    _supplier_invoice(qonto, seed=1)
    qonto.faults.fail_next(
        "/v2/client_invoices", 429, count=qonto_api.POLICY.attempts, retry_after=0.01
    )
    result = await _scan(upstream_settings, pool)
    marks = await pool.fetchrow("SELECT * FROM connections WHERE id = $1", connection_id)
    assert marks is not None
    assert marks["client_invoices_scanned_to"] is None
    assert marks["supplier_invoices_scanned_to"] is not None
    assert marks["transactions_scanned_to"] is not None
    assert marks["state"] == "active"
    [error] = result.connections[0].errors
    assert error.startswith("client_invoice:")
    assert "watermark kept" in error
    assert result.connections[0].new_documents == 1


async def test_one_refused_connection_does_not_stop_the_others(
    upstream_settings: config.Settings,
    pool: asyncpg.Pool,
    connection_id: uuid.UUID,
    qonto: qonto_sandbox.QontoSandbox,
) -> None:
    """The first connection's key is refused (needs attention); the second is scanned in full."""
    healthy = await factories.connect(upstream_settings, pool, qonto, client_name="Second")
    box = crypto.Box(upstream_settings.secret_key.reveal())
    await credentials.store_qonto(
        pool,
        box,
        connection_id,
        credentials.QontoApiKey(login=qonto.login, secret=config.Secret("a-revoked-key")),
    )
    _supplier_invoice(qonto, seed=2)
    result = await _scan(upstream_settings, pool)
    refused = result.for_connection(connection_id)
    scanned = result.for_connection(healthy)
    assert refused is not None
    assert scanned is not None
    assert refused.errors
    assert scanned.errors == []
    assert scanned.new_documents == 1
    rows = {r["id"]: r for r in await pool.fetch("SELECT id, state, state_reason FROM connections")}
    assert rows[connection_id]["state"] == "needs_attention"
    assert "reconnect the organization" in rows[connection_id]["state_reason"]
    assert rows[healthy]["state"] == "active"
    assert "a-revoked-key" not in rows[connection_id]["state_reason"]


async def test_disconnected_connections_are_not_scanned(
    upstream_settings: config.Settings,
    pool: asyncpg.Pool,
    connection_id: uuid.UUID,
    qonto: qonto_sandbox.QontoSandbox,
) -> None:
    """A connection an operator disconnected asks Qonto nothing and gets no documents."""
    await connections.disconnect(pool, connection_id)
    _supplier_invoice(qonto, seed=3)
    asked_before = len(qonto.requests)
    result = await _scan(upstream_settings, pool)
    assert result.connections == []
    assert len(qonto.requests) == asked_before
    assert await pool.fetchval("SELECT count(*) FROM documents") == 0


async def test_since_reaches_back_before_the_connection_existed(
    upstream_settings: config.Settings,
    pool: asyncpg.Pool,
    connection_id: uuid.UUID,
    qonto: qonto_sandbox.QontoSandbox,
) -> None:
    """An invoice updated three days ago is outside the first window, found with since=7 days."""
    qonto.clock = -3 * 86400
    _supplier_invoice(qonto, seed=4)
    qonto.clock = 0
    first = await _scan(upstream_settings, pool)
    assert first.connections[0].new_documents == 0
    week_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=7)
    backfill = await _scan(upstream_settings, pool, connection_id=connection_id, since=week_ago)
    assert backfill.connections[0].new_documents == 1
    assert await pool.fetchval("SELECT source FROM documents") == "supplier_invoice"


async def test_a_receipt_replaced_on_a_transaction_is_skipped_by_the_next_scan(
    upstream_settings: config.Settings,
    pool: asyncpg.Pool,
    connection_id: uuid.UUID,
    qonto: qonto_sandbox.QontoSandbox,
) -> None:
    """The old attachment, still pending, becomes skipped 'deleted before sync'; the new is pending."""
    tx, old = factories.receipt(qonto, seed=5)
    await _scan(upstream_settings, pool)
    new = qonto.add_attachment(
        files.jpeg(seed=6), file_name="better.jpg", content_type="image/jpeg"
    )
    qonto.update_transaction(tx["id"], attachment_ids=[new])
    result = await _scan(upstream_settings, pool)
    assert result.connections[0].new_documents == 1
    rows = await pool.fetch("SELECT qonto_attachment_id, state, reason FROM documents")
    by_attachment = {r["qonto_attachment_id"]: (r["state"], r["reason"]) for r in rows}
    assert by_attachment == {old: ("skipped", "deleted before sync"), new: ("pending", None)}


async def test_an_oauth_connection_stores_the_token_rotated_during_the_scan(
    upstream_settings: config.Settings, pool: asyncpg.Pool, qonto: qonto_sandbox.QontoSandbox
) -> None:
    """The scan refreshes an expired access token and seals the new refresh token at once."""
    settings = dataclasses.replace(
        upstream_settings, qonto_client_id="app", qonto_client_secret=config.Secret("app-secret")
    )
    refresh = qonto.add_oauth_client("app", "app-secret")
    created = await connections.add(
        settings,
        pool,
        inputs.NewConnection(
            client_name="OAuth Co",
            qonto_organization_id=qonto.organization_id,
            qonto=credentials.QontoOAuth(refresh_token=config.Secret(refresh)),
            cegid=credentials.CegidCredentials(
                api_key=config.Secret(factories.FIRM_KEY),
                api_secret=config.Secret(factories.FIRM_SECRET),
            ),
            cegid_dossier="ACME001",
            cegid_domain="CABINET",
            webhook_secrets=(factories.WEBHOOK_SECRET,),
        ),
    )
    box = crypto.Box(settings.secret_key.reveal())
    stored, _ = await credentials.load(pool, box, created.connection.id)
    assert isinstance(stored, credentials.QontoOAuth)
    # the access token has expired since: only the refresh token is left
    await credentials.store_qonto(
        pool, box, created.connection.id, credentials.QontoOAuth(refresh_token=stored.refresh_token)
    )
    _supplier_invoice(qonto, seed=8)
    result = await _scan(settings, pool)
    assert result.connections[0].errors == []
    assert result.connections[0].new_documents == 1
    rotated, _ = await credentials.load(pool, box, created.connection.id)
    assert isinstance(rotated, credentials.QontoOAuth)
    assert rotated.refresh_token.reveal() != stored.refresh_token.reveal()
    assert rotated.access_token is not None


# ------------------------------------------------------------------------------ items updated mid-walk


def _asked(sandbox: qonto_sandbox.QontoSandbox, path: str) -> int:
    return sum(1 for _, asked, _ in sandbox.requests if asked == path)


def _pages(count: int) -> int:
    return -(-count // listing.PER_PAGE)


async def _supplier_documents(pool: asyncpg.Pool) -> set[str]:
    rows = await pool.fetch(
        "SELECT qonto_attachment_id FROM documents WHERE source = 'supplier_invoice'"
    )
    return {r["qonto_attachment_id"] for r in rows}


async def test_a_supplier_invoice_updated_mid_scan_does_not_hide_another(
    upstream_settings: config.Settings,
    pool: asyncpg.Pool,
    connection_id: uuid.UUID,
    qonto: qonto_sandbox.QontoSandbox,
) -> None:
    """The reviewer's case: 150 invoices, the first one approved after page 1 was read. All 150
    become documents (the old walk listed 149 and moved the watermark past the lost one), in no
    more than pages + 2 requests."""
    invoices = [_supplier_invoice(qonto, seed=seed) for seed in range(150)]
    qonto.after_page(
        "/v2/supplier_invoices",
        lambda n: n == 1 and qonto.set_supplier_invoice_status(str(invoices[0]["id"]), "paid"),
    )
    result = await _scan(upstream_settings, pool)
    assert result.connections[0].errors == []
    assert result.connections[0].seen["supplier_invoice"] == 150
    assert await _supplier_documents(pool) == {str(i["attachment_id"]) for i in invoices}
    assert _asked(qonto, "/v2/supplier_invoices") <= _pages(150) + 2


async def test_supplier_invoices_spread_over_time_are_walked_by_cursor_through_updates(
    upstream_settings: config.Settings,
    pool: asyncpg.Pool,
    connection_id: uuid.UUID,
    qonto: qonto_sandbox.QontoSandbox,
) -> None:
    """250 invoices two seconds apart, one updated after each of the first two pages: every
    request is a page 1 from a moving cursor; all 250 found in pages + 1 requests."""
    invoices = []
    for seed in range(250):
        qonto.clock = -600 + 2 * seed
        invoices.append(_supplier_invoice(qonto, seed=seed))
    qonto.clock = 0

    def update(n: int) -> None:
        if n in (1, 2):
            qonto.set_supplier_invoice_status(str(invoices[(n - 1) * 100 + 5]["id"]), "paid")

    qonto.after_page("/v2/supplier_invoices", update)
    result = await _scan(
        upstream_settings, pool, since=dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    )
    assert result.connections[0].errors == []
    assert await _supplier_documents(pool) == {str(i["attachment_id"]) for i in invoices}
    assert _asked(qonto, "/v2/supplier_invoices") <= _pages(250) + 1


@pytest.mark.parametrize("totals", [True, False], ids=["total_count", "no_total_count"])
async def test_supplier_invoices_sharing_one_updated_at_are_all_found_through_an_update(
    upstream_settings: config.Settings,
    pool: asyncpg.Pool,
    connection_id: uuid.UUID,
    qonto: qonto_sandbox.QontoSandbox,
    totals: bool,
) -> None:
    """250 invoices stamped in one instant (a bulk import: the cursor cannot move), one updated
    after page 1: all found; pages + 2 requests with total_count, three walks without it."""
    qonto.list_totals = totals
    with qonto.one_instant():
        invoices = [_supplier_invoice(qonto, seed=seed) for seed in range(250)]
    assert len({i["updated_at"] for i in invoices}) == 1
    qonto.after_page(
        "/v2/supplier_invoices",
        lambda n: n == 1 and qonto.set_supplier_invoice_status(str(invoices[7]["id"]), "paid"),
    )
    result = await _scan(upstream_settings, pool)
    assert result.connections[0].errors == []
    assert await _supplier_documents(pool) == {str(i["attachment_id"]) for i in invoices}
    asked = _asked(qonto, "/v2/supplier_invoices")
    assert asked <= (_pages(250) + 2 if totals else 3 * _pages(250))


async def test_a_transaction_updated_mid_scan_does_not_hide_another(
    upstream_settings: config.Settings,
    pool: asyncpg.Pool,
    connection_id: uuid.UUID,
    qonto: qonto_sandbox.QontoSandbox,
) -> None:
    """150 transactions with receipts, one given another receipt after page 1 was read: the 150
    receipts listed become documents (the new one is the next scan's), pages + 2 requests."""
    made = [factories.receipt(qonto, seed=seed) for seed in range(150)]
    replacement = qonto.add_attachment(
        files.jpeg(seed=999), file_name="better.jpg", content_type="image/jpeg"
    )
    qonto.after_page(
        "/v2/transactions",
        lambda n: (
            n == 1 and qonto.update_transaction(str(made[0][0]["id"]), attachment_ids=[replacement])
        ),
    )
    result = await _scan(upstream_settings, pool)
    assert result.connections[0].errors == []
    assert result.connections[0].seen["transaction"] == 150
    rows = await pool.fetch(
        "SELECT qonto_attachment_id FROM documents WHERE source = 'transaction'"
    )
    assert {r["qonto_attachment_id"] for r in rows} == {attachment for _, attachment in made}
    assert _asked(qonto, "/v2/transactions") <= _pages(150) + 2


async def test_a_client_invoice_updated_mid_scan_does_not_hide_another(
    upstream_settings: config.Settings,
    pool: asyncpg.Pool,
    connection_id: uuid.UUID,
    qonto: qonto_sandbox.QontoSandbox,
) -> None:
    """150 unpaid client invoices, one updated after page 1 (it moves to the end): every one is a
    document, found by the settled passes (no documented sort to keep a cursor on)."""
    invoices = [
        qonto.add_client_invoice(
            attachment_id=qonto.add_attachment(
                files.pdf(seed=seed), file_name=f"F-{seed}.pdf", content_type="application/pdf"
            ),
            status="unpaid",
            total="10.00",
        )
        for seed in range(150)
    ]
    qonto.after_page(
        "/v2/client_invoices",
        lambda n: n == 1 and qonto.set_client_invoice_status(str(invoices[0]["id"]), "unpaid"),
    )
    result = await _scan(upstream_settings, pool)
    assert result.connections[0].errors == []
    rows = await pool.fetch(
        "SELECT qonto_attachment_id FROM documents WHERE source = 'client_invoice'"
    )
    assert {r["qonto_attachment_id"] for r in rows} == {str(i["attachment_id"]) for i in invoices}
