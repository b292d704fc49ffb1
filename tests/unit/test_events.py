"""Parsing Qonto events and resources tolerantly, and classifying topics."""

from __future__ import annotations

import datetime as dt

import orjson
import pytest

from relay import errors, events, models
from tests.conftest import fixture_bytes, load_fixture


def test_the_documented_transaction_event_parses() -> None:
    """The contract's example: one document per attachment, PURCHASE for a debit."""
    event = events.parse(fixture_bytes("webhook-transaction-updated.json"))
    assert event.kind is events.Kind.TRANSACTION
    snapshot = events.transaction_snapshot(event.data)
    assert [d.attachment_id for d in snapshot.documents] == [
        "3e9a7c51-0d2b-4f8e-a6c4-1b5d7e9f0a23",
        "8b2d4f6a-1c3e-4a5b-9d7f-0e2c4a6b8d1f",
    ]
    first = snapshot.documents[0]
    assert first.direction == models.Direction.PURCHASE
    assert (first.amount, first.currency, first.counterparty) == ("84.00", "EUR", "Le Petit Zinc")
    assert first.document_date == dt.date(2026, 11, 22)
    assert snapshot.updated_at == dt.datetime(2026, 11, 23, 9, 41, 6, tzinfo=dt.UTC)


def test_amounts_as_strings_or_objects_and_credit_side() -> None:
    """Payload shapes drift: amounts as strings, a credit is a SALE."""
    tx = {"id": "t", "side": "credit", "amount": "12.5", "attachment_ids": ["a", "a", "b"]}
    snapshot = events.transaction_snapshot(tx)
    assert [d.attachment_id for d in snapshot.documents] == ["a", "b"]
    assert snapshot.documents[0].direction == models.Direction.SALE
    assert snapshot.documents[0].amount == "12.5"


def test_client_invoice_without_attachment_needs_a_fetch() -> None:
    """The documented webhook lacks attachment_id: the consumer must re-fetch the invoice."""
    event = events.parse(fixture_bytes("webhook-client-invoice-updated.json"))
    assert events.client_invoice_needs_fetch(event.data)
    fetched = load_fixture("api-client-invoice.json")["client_invoice"]
    snapshot = events.client_invoice_snapshot(fetched)
    [document] = snapshot.documents
    assert document.direction == models.Direction.SALE
    assert document.attachment_id == "e5f6a7b8-c9d0-4e1f-9a2b-3c4d5e6f7a8b"


@pytest.mark.parametrize("status", ["draft", "canceled"])
def test_drafts_and_canceled_invoices_are_no_documents(status: str) -> None:
    """Only unpaid and paid client invoices are accounting documents."""
    invoice = {"id": "i", "status": status, "attachment_id": "a"}
    assert events.client_invoice_snapshot(invoice).documents == ()
    assert not events.client_invoice_needs_fetch(invoice)


def test_supplier_invoices_whatever_their_status() -> None:
    """Every supplier invoice is a PURCHASE document, paid or not."""
    page = load_fixture("api-supplier-invoices-page.json")
    snapshot = events.supplier_invoice_snapshot(page["supplier_invoices"][0])
    [document] = snapshot.documents
    assert (document.direction, document.counterparty, document.amount) == (
        models.Direction.PURCHASE,
        "OVH SAS",
        "71.88",
    )


@pytest.mark.parametrize(
    ("topic", "kind"),
    [
        ("v1/transactions", events.Kind.TRANSACTION),
        ("v1/client-invoices", events.Kind.CLIENT_INVOICE),
        ("v1/consent-revocations", events.Kind.CONSENT_REVOCATION),
        ("v1/cards", events.Kind.IGNORED),
    ],
)
def test_topics_the_relay_knows(topic: str, kind: events.Kind) -> None:
    """Used topics are handled, others recorded and ignored."""
    assert events.classify(topic) is kind


@pytest.mark.parametrize(
    "body",
    [
        b"nope",
        b"[]",
        b'{"id": 1, "type": "v1/transactions"}',
        b'{"id": "e", "type": "v2/transactions"}',
        b'{"id": "e", "type": "v1/transactions", "data": {}}',
        b'{"id": "e", "type": "transactions"}',
    ],
)
def test_unusable_messages_are_invalid_events(body: bytes) -> None:
    """Not JSON, not an event, an unknown version, no resource id: InvalidEvent (dead-lettered)."""
    with pytest.raises(errors.InvalidEvent):
        events.parse(body)


def test_consent_revocation_needs_no_resource_id() -> None:
    event = events.parse(fixture_bytes("webhook-consent-revocation.json"))
    assert event.kind is events.Kind.CONSENT_REVOCATION
    assert orjson.loads(fixture_bytes("webhook-consent-revocation.json"))["data"] == event.data
