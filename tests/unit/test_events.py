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
    """The documented consent revocation parses: its data is kept as sent, no resource id needed."""
    event = events.parse(fixture_bytes("webhook-consent-revocation.json"))
    assert event.kind is events.Kind.CONSENT_REVOCATION
    assert orjson.loads(fixture_bytes("webhook-consent-revocation.json"))["data"] == event.data


@pytest.mark.parametrize(
    "topic", ["v2/transactions", "v3/client-invoices", "v0/consent-revocations"]
)
def test_a_used_topic_in_an_unknown_version_is_invalid(topic: str) -> None:
    """A version of a used topic this relay does not know is dead-lettered, for replay later."""
    with pytest.raises(errors.InvalidEvent, match="unknown version"):
        events.classify(topic)


def test_an_unused_topic_needs_no_data() -> None:
    """A topic the relay does not use is an event to record even without a data object."""
    event = events.parse(b'{"id": "e", "type": "v1/cards", "organization_id": "o"}')
    assert (event.kind, event.data, event.organization_id) == (events.Kind.IGNORED, {}, "o")


@pytest.mark.parametrize(
    ("amount", "expected"),
    [
        (84, ("84.00", None)),
        (84.5, ("84.50", None)),
        (" 84.5 ", ("84.5", None)),
        ({"value": "84.00", "currency": "USD"}, ("84.00", "USD")),
        (None, (None, None)),
        (True, (None, None)),
    ],
)
def test_amounts_as_numbers_strings_or_objects(amount: object, expected: tuple[str, ...]) -> None:
    """Amounts parse from numbers, strings or {value, currency} objects; nonsense is no amount."""
    tx = {"id": "t", "side": "debit", "amount": amount, "attachment_ids": ["a"]}
    [document] = events.transaction_snapshot(tx).documents
    assert (document.amount, document.currency) == expected


@pytest.mark.parametrize(
    "account", [{"bank_account_id": "b"}, {"bank_account": {"id": "b", "iban": "FR76..."}}, {}]
)
def test_the_bank_account_shape_does_not_matter(account: dict[str, object]) -> None:
    """bank_account_id, a bank_account object or neither: the event parses the same."""
    body = {
        "id": "e",
        "type": "v1/transactions",
        "data": {"id": "t", "side": "debit", "attachment_ids": ["a"], **account},
    }
    event = events.parse(orjson.dumps(body))
    assert [d.attachment_id for d in events.transaction_snapshot(event.data).documents] == ["a"]


def test_a_snapshot_without_updated_at_takes_the_envelope_time() -> None:
    """Transactions without updated_at are ordered by the event's created_at."""
    event = events.parse(
        b'{"id": "e", "type": "v1/transactions", "created_at": "2026-11-23T09:41:07Z",'
        b' "data": {"id": "t", "attachment_ids": []}}'
    )
    snapshot = events.transaction_snapshot(event.data, fallback=event.created_at)
    assert snapshot.updated_at == dt.datetime(2026, 11, 23, 9, 41, 7, tzinfo=dt.UTC)


def test_nul_characters_are_stripped_from_every_string_and_key() -> None:
    """JSON \\u0000 passes orjson but not PostgreSQL: parse removes it everywhere, keys included."""
    body = (
        b'{"id": "evt\\u0000-1", "type": "v1/transactions", "organization_id": "org\\u0000",'
        b' "data": {"id": "tx\\u0000", "label": "Le\\u0000 Zinc", "attachment_ids": ["a\\u0000"],'
        b' "note\\u0000": {"deep": [["x\\u0000y", 1, null, true]]}}}'
    )
    event = events.parse(body)
    assert (event.id, event.organization_id) == ("evt-1", "org")
    assert event.data == {
        "id": "tx",
        "label": "Le Zinc",
        "attachment_ids": ["a"],
        "note": {"deep": [["xy", 1, None, True]]},
    }
    snapshot = events.transaction_snapshot(event.data)
    assert [(d.attachment_id, d.counterparty) for d in snapshot.documents] == [("a", "Le Zinc")]


def test_json_without_nul_is_decoded_as_orjson_decodes_it() -> None:
    """The fast path: no \\u0000 escape in the bytes, the value is orjson's, untouched."""
    raw = load_fixture("webhook-transaction-updated.json")
    body = orjson.dumps(raw)
    assert events.loads(body) == orjson.loads(body) == raw
    assert events.payload_text(body) == body.decode()
    literal = b'{"a": "\\\\u0000 is how JSON writes NUL"}'  # an escaped backslash, no NUL
    assert events.loads(literal) == {"a": "\\u0000 is how JSON writes NUL"}


def test_scrub_copies_and_survives_the_deepest_json_orjson_accepts() -> None:
    """scrub leaves its input alone and walks nesting deeper than Python's recursion limit."""
    original = {"k\x00": ["v\x00", {"x": "\x00"}]}
    assert events.scrub(original) == {"k": ["v", {"x": ""}]}
    assert original == {"k\x00": ["v\x00", {"x": "\x00"}]}
    depth = 1000
    body = b"[" * depth + b'"\\u0000"' + b"]" * depth
    value = events.loads(body)
    for _ in range(depth):
        value = value[0]
    assert value == ""


def test_the_stored_payload_has_no_nul() -> None:
    """payload_text: the body re-serialized without NUL when it had one, otherwise as received."""
    body = b'{"id": "e", "type": "v1/cards", "data": {"n\\u0000": "a\\u0000b"}}'
    text = events.payload_text(body)
    assert "\\u0000" not in text
    assert orjson.loads(text) == {"id": "e", "type": "v1/cards", "data": {"n": "ab"}}
    assert events.payload_text(b"not json \\u0000") == "not json \\u0000"


@pytest.mark.parametrize(
    ("payload", "ids", "complete"),
    [
        ({}, [], False),
        ({"attachment_ids": None}, [], False),
        ({"attachment_ids": "a"}, [], False),
        ({"attachment_ids": []}, [], True),
        ({"attachment_ids": ["a", "b"]}, ["a", "b"], True),
        ({"attachment_ids": ["a", 7, ""]}, ["a"], False),
        ({"attachments": [{"id": "a"}, {"id": "b", "file_name": "b.pdf"}]}, ["a", "b"], True),
        ({"attachments": [{"id": "a"}, {"file_name": "nameless.pdf"}]}, ["a"], False),
        ({"attachments": []}, [], True),
    ],
)
def test_only_a_payload_carrying_its_attachment_list_is_complete(
    payload: dict[str, object], ids: list[str], complete: bool
) -> None:
    """A transaction without (readable) attachment list adds what it names and skips nothing."""
    snapshot = events.transaction_snapshot({"id": "t", "side": "debit", **payload})
    assert [d.attachment_id for d in snapshot.documents] == ids
    assert snapshot.complete is complete
