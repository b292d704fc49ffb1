"""Snapshots into documents (the one path for webhooks and the daily scan), on the real PostgreSQL."""

from __future__ import annotations

import copy
import datetime as dt
import uuid
from collections.abc import Callable
from typing import Any

import asyncpg
import pytest

from relay import events, models
from relay.domain import ingest
from tests.conftest import load_fixture

Snapshot = Callable[[dict[str, Any]], events.Snapshot]


async def _in_tx(
    pool: asyncpg.Pool, snapshot: Snapshot, connection_id: uuid.UUID, resource: dict[str, Any]
) -> ingest.Applied:
    """One Qonto resource applied as the consumer and the scanner apply them (a batch of one)."""
    async with pool.acquire() as conn, conn.transaction():
        return await ingest.apply(conn, [(connection_id, snapshot(resource))])


def _tx(
    attachment_ids: list[str],
    *,
    updated_at: str | None = "2026-11-23T09:00:00Z",
    side: str = "debit",
    tx_id: str = "tx-1",
) -> dict[str, Any]:
    value: dict[str, Any] = {
        "id": tx_id,
        "side": side,
        "amount": 84.0,
        "currency": "EUR",
        "label": "RESTAURANT LE PETIT ZINC",
        "clean_counterparty_name": "Le Petit Zinc",
        "settled_at": "2026-11-22T12:58:00Z",
        "emitted_at": "2026-11-22T12:57:31Z",
        "attachment_ids": attachment_ids,
    }
    if updated_at is not None:
        value["updated_at"] = updated_at
    return value


def _client_invoice(status: str, **changes: Any) -> dict[str, Any]:
    value: dict[str, Any] = copy.deepcopy(load_fixture("api-client-invoice.json")["client_invoice"])
    value["status"] = status
    value.update(changes)
    return value


async def _documents(pool: asyncpg.Pool) -> list[models.Document]:
    return [models.Document.from_record(r) for r in await pool.fetch("SELECT * FROM documents")]


async def _by_attachment(pool: asyncpg.Pool) -> dict[str, tuple[str, str | None]]:
    """Attachment id → (state, reason)."""
    return {d.qonto_attachment_id: (d.state, d.reason) for d in await _documents(pool)}


async def test_debit_is_a_purchase_with_one_document_per_attachment(
    pool: asyncpg.Pool, connection_id: uuid.UUID
) -> None:
    """A debit listing an attachment twice makes one pending PURCHASE per attachment id."""
    applied = await _in_tx(pool, events.transaction_snapshot, connection_id, _tx(["a", "b", "a"]))
    assert (applied.outcome, applied.created, applied.skipped) == ("applied", 2, 0)
    documents = sorted(await _documents(pool), key=lambda d: d.qonto_attachment_id)
    assert [(d.qonto_attachment_id, d.direction, d.state) for d in documents] == [
        ("a", "PURCHASE", "pending"),
        ("b", "PURCHASE", "pending"),
    ]
    first = documents[0]
    assert (first.source, first.qonto_resource_id) == ("transaction", "tx-1")
    assert (first.document_date, first.counterparty) == (dt.date(2026, 11, 22), "Le Petit Zinc")
    assert (first.amount, first.currency) == ("84.00", "EUR")


async def test_credit_is_a_sale_dated_by_emission_when_not_settled(
    pool: asyncpg.Pool, connection_id: uuid.UUID
) -> None:
    """A credit is a SALE; without settled_at the date is emitted_at's, the label the counterparty."""
    tx = _tx(["c"], side="credit")
    del tx["settled_at"], tx["clean_counterparty_name"]
    await _in_tx(pool, events.transaction_snapshot, connection_id, tx)
    [document] = await _documents(pool)
    assert (document.direction, document.document_date) == ("SALE", dt.date(2026, 11, 22))
    assert document.counterparty == "RESTAURANT LE PETIT ZINC"


async def test_applying_the_same_snapshot_again_changes_nothing(
    pool: asyncpg.Pool, connection_id: uuid.UUID
) -> None:
    """Idempotent: the same snapshot applied twice creates nothing the second time."""
    await _in_tx(pool, events.transaction_snapshot, connection_id, _tx(["a", "b"]))
    before = await _documents(pool)
    again = await _in_tx(pool, events.transaction_snapshot, connection_id, _tx(["a", "b"]))
    assert (again.outcome, again.created, again.skipped) == ("applied", 0, 0)
    assert await _documents(pool) == before


async def test_an_attachment_gone_from_a_newer_snapshot_is_skipped_as_deleted(
    pool: asyncpg.Pool, connection_id: uuid.UUID
) -> None:
    """A pending document whose attachment a newer snapshot no longer lists: skipped, deleted."""
    await _in_tx(pool, events.transaction_snapshot, connection_id, _tx(["a", "b"]))
    newer = _tx(["a"], updated_at="2026-11-23T10:00:00Z")
    applied = await _in_tx(pool, events.transaction_snapshot, connection_id, newer)
    assert (applied.outcome, applied.created, applied.skipped) == ("applied", 0, 1)
    assert await _by_attachment(pool) == {
        "a": ("pending", None),
        "b": ("skipped", models.SKIP_DELETED),
    }


async def test_a_newer_payload_without_attachment_list_skips_nothing(
    pool: asyncpg.Pool, connection_id: uuid.UUID
) -> None:
    """A snapshot lacking attachment_ids (payloads drift) says nothing of the files: none skipped."""
    await _in_tx(pool, events.transaction_snapshot, connection_id, _tx(["a", "b"]))
    newer = _tx([], updated_at="2026-11-23T10:00:00Z")
    del newer["attachment_ids"]
    applied = await _in_tx(pool, events.transaction_snapshot, connection_id, newer)
    assert (applied.outcome, applied.created, applied.skipped) == ("applied", 0, 0)
    named = {**_tx([], updated_at="2026-11-23T11:00:00Z"), "attachment_ids": None}
    named["attachments"] = [{"id": "c"}, {"file_name": "no-id.pdf"}]
    applied = await _in_tx(pool, events.transaction_snapshot, connection_id, named)
    assert (applied.outcome, applied.created, applied.skipped) == ("applied", 1, 0)
    assert await _by_attachment(pool) == {
        "a": ("pending", None),
        "b": ("pending", None),
        "c": ("pending", None),
    }
    listed = _tx(["a"], updated_at="2026-11-23T12:00:00Z")  # a complete list still deletes
    applied = await _in_tx(pool, events.transaction_snapshot, connection_id, listed)
    assert applied.skipped == 2


async def test_an_attachment_listed_again_comes_back_to_pending(
    pool: asyncpg.Pool, connection_id: uuid.UUID
) -> None:
    """Removed then attached again in a still newer snapshot: pending again, no second document."""
    await _in_tx(pool, events.transaction_snapshot, connection_id, _tx(["a", "b"]))
    await _in_tx(
        pool,
        events.transaction_snapshot,
        connection_id,
        _tx(["a"], updated_at="2026-11-23T10:00:00Z"),
    )
    back = _tx(["a", "b"], updated_at="2026-11-23T11:00:00Z")
    applied = await _in_tx(pool, events.transaction_snapshot, connection_id, back)
    assert applied.created == 1  # the skipped document, back to pending
    assert await _by_attachment(pool) == {"a": ("pending", None), "b": ("pending", None)}


async def test_an_older_snapshot_neither_resurrects_nor_deletes(
    pool: asyncpg.Pool, connection_id: uuid.UUID
) -> None:
    """Qonto does not promise order: a strictly older snapshot is stale and changes no document;
    a file only it names is listed, deleted before sync (the newest snapshot leaves it out)."""
    await _in_tx(pool, events.transaction_snapshot, connection_id, _tx(["a", "b"]))
    await _in_tx(
        pool,
        events.transaction_snapshot,
        connection_id,
        _tx(["a"], updated_at="2026-11-23T10:00:00Z"),
    )
    late = await _in_tx(pool, events.transaction_snapshot, connection_id, _tx(["a", "b", "c"]))
    assert (late.outcome, late.created, late.skipped) == ("stale", 0, 1)
    older = _tx([], updated_at="2026-11-23T08:00:00Z")
    assert (
        await _in_tx(pool, events.transaction_snapshot, connection_id, older)
    ).outcome == "stale"
    assert await _by_attachment(pool) == {
        "a": ("pending", None),
        "b": ("skipped", models.SKIP_DELETED),
        "c": ("skipped", models.SKIP_DELETED),
    }


async def test_without_updated_at_the_envelope_time_orders_snapshots(
    pool: asyncpg.Pool, connection_id: uuid.UUID
) -> None:
    """A payload without updated_at is ordered by the webhook's created_at (the fallback)."""
    newer = dt.datetime(2026, 11, 23, 10, tzinfo=dt.UTC)
    older = newer - dt.timedelta(minutes=5)
    async with pool.acquire() as conn, conn.transaction():
        await ingest.apply(
            conn,
            [
                (
                    connection_id,
                    events.transaction_snapshot(_tx(["a"], updated_at=None), fallback=newer),
                )
            ],
        )
        stale = await ingest.apply(
            conn,
            [
                (
                    connection_id,
                    events.transaction_snapshot(_tx(["a", "b"], updated_at=None), fallback=older),
                )
            ],
        )
    assert stale.outcome == "stale"
    assert await _by_attachment(pool) == {
        "a": ("pending", None),
        "b": ("skipped", models.SKIP_DELETED),
    }


async def test_an_uploaded_document_stays_uploaded_when_its_attachment_is_removed(
    pool: asyncpg.Pool, connection_id: uuid.UUID
) -> None:
    """Deleting a file in Qonto after it reached Loop changes nothing: it stays uploaded."""
    await _in_tx(pool, events.transaction_snapshot, connection_id, _tx(["a", "b"]))
    await pool.execute("UPDATE documents SET state = 'uploaded' WHERE qonto_attachment_id = 'a'")
    removed = await _in_tx(
        pool, events.transaction_snapshot, connection_id, _tx([], updated_at="2026-11-23T10:00:00Z")
    )
    assert removed.skipped == 1
    assert await _by_attachment(pool) == {
        "a": ("uploaded", None),
        "b": ("skipped", models.SKIP_DELETED),
    }


async def test_one_batch_keeps_the_newest_snapshot_of_each_resource(
    pool: asyncpg.Pool, connection_id: uuid.UUID
) -> None:
    """Two snapshots of one transaction in one batch, newest first: the newest wins, and the file
    only the older one names is listed, deleted before sync."""
    newest = events.transaction_snapshot(_tx(["a"], updated_at="2026-11-23T10:00:00Z"))
    oldest = events.transaction_snapshot(_tx(["a", "b"]))
    async with pool.acquire() as conn, conn.transaction():
        applied = await ingest.apply(conn, [(connection_id, newest), (connection_id, oldest)])
    assert (applied.created, applied.skipped) == (1, 1)
    assert await _by_attachment(pool) == {
        "a": ("pending", None),
        "b": ("skipped", models.SKIP_DELETED),
    }


async def _apply_batches(
    pool: asyncpg.Pool, connection_id: uuid.UUID, batches: list[list[events.Snapshot]]
) -> None:
    for batch in batches:
        async with pool.acquire() as conn, conn.transaction():
            await ingest.apply(conn, [(connection_id, s) for s in batch])


@pytest.mark.parametrize("newer_first", [False, True], ids=["older-first", "newer-first"])
@pytest.mark.parametrize("one_batch", [True, False], ids=["one-batch", "two-batches"])
async def test_a_removed_attachment_is_listed_whatever_the_batches_and_their_order(
    pool: asyncpg.Pool, connection_id: uuid.UUID, newer_first: bool, one_batch: bool
) -> None:
    """A later snapshot removes b: b is listed, skipped as deleted before sync, whether the two
    snapshots come in one batch or two, older or newer first (the newest wins)."""
    older = events.transaction_snapshot(_tx(["a", "b"]))
    newer = events.transaction_snapshot(_tx(["a"], updated_at="2026-11-23T10:00:00Z"))
    order = [newer, older] if newer_first else [older, newer]
    await _apply_batches(pool, connection_id, [order] if one_batch else [[s] for s in order])
    assert await _by_attachment(pool) == {
        "a": ("pending", None),
        "b": ("skipped", models.SKIP_DELETED),
    }


@pytest.mark.parametrize("newer_first", [False, True], ids=["older-first", "newer-first"])
@pytest.mark.parametrize("one_batch", [True, False], ids=["one-batch", "two-batches"])
async def test_a_newest_snapshot_without_its_list_leaves_older_files_pending_in_any_order(
    pool: asyncpg.Pool, connection_id: uuid.UUID, newer_first: bool, one_batch: bool
) -> None:
    """The newest snapshot carries no attachment list (it says nothing of the files it does not
    name): the files an older one named are pending, whatever the batches and their order."""
    older = events.transaction_snapshot(_tx(["a", "b"]))
    payload = _tx([], updated_at="2026-11-23T10:00:00Z")
    del payload["attachment_ids"]
    newer = events.transaction_snapshot(payload)
    order = [newer, older] if newer_first else [older, newer]
    await _apply_batches(pool, connection_id, [order] if one_batch else [[s] for s in order])
    assert await _by_attachment(pool) == {"a": ("pending", None), "b": ("pending", None)}


@pytest.mark.parametrize("status", ["to_pay", "paid", "archived"])
async def test_a_supplier_invoice_is_a_purchase_whatever_its_status(
    pool: asyncpg.Pool, connection_id: uuid.UUID, status: str
) -> None:
    """Every supplier invoice with a file is a PURCHASE named from its supplier and amount."""
    invoice = load_fixture("api-supplier-invoices-page.json")["supplier_invoices"][0]
    invoice = {**invoice, "status": status}
    applied = await _in_tx(pool, events.supplier_invoice_snapshot, connection_id, invoice)
    assert (applied.outcome, applied.created) == ("applied", 1)
    [document] = await _documents(pool)
    assert (document.source, document.direction) == ("supplier_invoice", "PURCHASE")
    assert (document.qonto_resource_id, document.qonto_attachment_id) == (
        invoice["id"],
        invoice["attachment_id"],
    )
    assert (document.counterparty, document.amount, document.currency) == (
        "OVH SAS",
        "71.88",
        "EUR",
    )
    assert (document.document_date, document.qonto_file_name) == (
        dt.date(2026, 11, 1),
        "OVH-FR51234567.pdf",
    )


@pytest.mark.parametrize("status", ["unpaid", "paid"])
async def test_an_unpaid_or_paid_client_invoice_is_a_sale(
    pool: asyncpg.Pool, connection_id: uuid.UUID, status: str
) -> None:
    """Unpaid and paid client invoices are SALE documents; without a client name, the number."""
    applied = await _in_tx(
        pool, events.client_invoice_snapshot, connection_id, _client_invoice(status)
    )
    assert (applied.outcome, applied.created) == ("applied", 1)
    [document] = await _documents(pool)
    assert (document.source, document.direction, document.state) == (
        "client_invoice",
        "SALE",
        "pending",
    )
    assert (document.counterparty, document.amount, document.document_date) == (
        "F-2026-0117",
        "1440.00",
        dt.date(2026, 11, 2),
    )


async def test_a_client_invoice_is_named_after_its_client_when_known(
    pool: asyncpg.Pool, connection_id: uuid.UUID
) -> None:
    """A client invoice carrying its client's name uses it as the counterparty."""
    invoice = _client_invoice("paid", client={"name": "Globex SARL"})
    await _in_tx(pool, events.client_invoice_snapshot, connection_id, invoice)
    [document] = await _documents(pool)
    assert document.counterparty == "Globex SARL"


@pytest.mark.parametrize("status", ["draft", "canceled"])
async def test_a_draft_or_canceled_client_invoice_is_no_document(
    pool: asyncpg.Pool, connection_id: uuid.UUID, status: str
) -> None:
    """A draft or canceled client invoice creates nothing (the consumer records the event as
    not_a_document)."""
    applied = await _in_tx(
        pool, events.client_invoice_snapshot, connection_id, _client_invoice(status)
    )
    assert (applied.outcome, applied.created) == ("applied", 0)
    assert await _documents(pool) == []


async def test_a_paid_invoice_canceled_later_keeps_its_document(
    pool: asyncpg.Pool, connection_id: uuid.UUID
) -> None:
    """Canceled after it was paid: the document stays pending (it was an accounting document)."""
    await _in_tx(pool, events.client_invoice_snapshot, connection_id, _client_invoice("paid"))
    canceled = _client_invoice("canceled", updated_at="2026-11-24T10:00:00+01:00")
    applied = await _in_tx(pool, events.client_invoice_snapshot, connection_id, canceled)
    assert (applied.outcome, applied.created) == ("applied", 0)
    [document] = await _documents(pool)
    assert (document.state, document.reason) == ("pending", None)


async def test_a_paid_invoice_whose_cancellation_came_first_keeps_its_document(
    pool: asyncpg.Pool, connection_id: uuid.UUID
) -> None:
    """The same two snapshots the other way round (Qonto does not promise order): the paid
    invoice, older, is stale but its file is listed and pending all the same."""
    canceled = _client_invoice("canceled", updated_at="2026-11-24T10:00:00+01:00")
    await _in_tx(pool, events.client_invoice_snapshot, connection_id, canceled)
    paid = await _in_tx(
        pool, events.client_invoice_snapshot, connection_id, _client_invoice("paid")
    )
    assert (paid.outcome, paid.created) == ("stale", 1)
    [document] = await _documents(pool)
    assert (document.state, document.reason) == ("pending", None)
