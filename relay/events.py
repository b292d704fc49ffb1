"""Qonto events and resources, parsed tolerantly into what the relay uses.

Payload shapes drift between Qonto's documentation versions (amounts as numbers or strings,
``bank_account_id`` or a ``bank_account`` object): only the fields used here are required. NUL
characters PostgreSQL cannot store are stripped at this boundary (:func:`loads`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import enum
import re
from typing import Any, Final

import orjson

from relay import errors, models

TRANSACTIONS: Final = "transactions"
CLIENT_INVOICES: Final = "client-invoices"
CONSENT_REVOCATIONS: Final = "consent-revocations"
USED: Final = {TRANSACTIONS: 1, CLIENT_INVOICES: 1, CONSENT_REVOCATIONS: 1}
_TOPIC = re.compile(r"^v(\d+)/([a-z0-9_.-]+)$")
EXPORTED_CLIENT_INVOICE_STATUSES: Final = frozenset({"unpaid", "paid"})


class Kind(enum.Enum):
    TRANSACTION = "transaction"
    CLIENT_INVOICE = "client_invoice"
    CONSENT_REVOCATION = "consent_revocation"
    IGNORED = "ignored"


@dataclasses.dataclass(frozen=True, slots=True)
class Event:
    id: str
    topic: str
    kind: Kind
    organization_id: str | None
    created_at: dt.datetime | None
    data: dict[str, Any]


@dataclasses.dataclass(frozen=True, slots=True)
class DocumentSpec:
    """One file of a resource, with what its Loop file name is made of."""

    attachment_id: str
    direction: models.Direction
    document_date: dt.date | None
    counterparty: str | None
    amount: str | None
    currency: str | None
    file_name: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class Snapshot:
    """The state of one Qonto resource at ``updated_at``, with the files it carries then."""

    source: models.Source
    resource_id: str
    updated_at: dt.datetime | None
    documents: tuple[DocumentSpec, ...]
    # a transaction payload carrying its attachment list names every file: one missing from a newer
    # complete snapshot was deleted. Incomplete snapshots only add documents, never skip one.
    complete: bool


_NUL_ESCAPE: Final = b"\\u0000"


def scrub(value: Any) -> Any:
    """Remove every NUL character from the strings of ``value`` (decoded JSON), keys included.

    PostgreSQL refuses NUL in ``text`` and ``jsonb``, and Qonto has no use for one. The input is left
    untouched (containers are copied), and the walk is iterative: the deepest JSON orjson decodes
    cannot exhaust the interpreter's recursion limit.
    """
    pending: list[dict[Any, Any] | list[Any]] = []

    def clean(item: Any) -> Any:
        if isinstance(item, str):
            return item.replace("\x00", "")
        if isinstance(item, dict | list):
            copy = dict(item) if isinstance(item, dict) else list(item)
            pending.append(copy)
            return copy
        return item

    result = clean(value)
    while pending:
        node = pending.pop()
        if isinstance(node, dict):
            entries = list(node.items())
            node.clear()
            for key, item in entries:
                node[clean(key)] = clean(item)
        else:
            for index, item in enumerate(node):
                node[index] = clean(item)
    return result


def loads(raw: bytes) -> Any:
    """Decode JSON as ``orjson.loads`` does, without NUL characters in any string.

    JSON may carry NUL characters (``\\u0000``) that PostgreSQL cannot store, in ``text`` columns
    or in ``jsonb``: this (and :func:`parse`, :func:`payload_text`) strips them from every string,
    keys included, at the boundary (see :func:`scrub`).

    The scrub runs only when the raw JSON holds a ``\\u0000`` escape (a raw NUL byte is not valid
    JSON), so the common case costs one scan of the bytes. Raises ``orjson.JSONDecodeError``.
    """
    value = orjson.loads(raw)
    return scrub(value) if _NUL_ESCAPE in raw else value


def payload_text(body: bytes) -> str:
    """Give a message body as the text to store in a ``jsonb`` column.

    That is the body as received, unless it carries NUL characters, which are removed (the JSON is
    then re-serialized).
    """
    if _NUL_ESCAPE in body:
        with contextlib.suppress(orjson.JSONDecodeError):  # not JSON: PostgreSQL will say so
            return orjson.dumps(loads(body)).decode("utf-8")
    return body.decode("utf-8", "replace")


def timestamp(value: Any) -> dt.datetime | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        moment = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


def _date(value: Any) -> dt.date | None:
    if not isinstance(value, str) or len(value) < 10:
        return None
    try:
        return dt.date.fromisoformat(value[:10])
    except ValueError:
        return None


def _amount(value: Any) -> tuple[str | None, str | None]:
    """Read an amount and its currency, from ``84.0``, ``"84.00"`` or an object.

    The object form is ``{"value": "84.00", "currency": "EUR"}``; each one gives
    ``("84.00", currency)``.
    """
    currency = None
    if isinstance(value, dict):
        currency = value.get("currency") if isinstance(value.get("currency"), str) else None
        value = value.get("value")
    if isinstance(value, bool) or value is None:
        return None, currency
    if isinstance(value, int | float):
        return f"{value:.2f}", currency
    if isinstance(value, str) and value.strip():
        return value.strip(), currency
    return None, currency


def _text(value: Any) -> str | None:
    return value.strip() if isinstance(value, str) and value.strip() else None


def classify(topic: str) -> Kind:
    """Say what the relay does with a topic (InvalidEvent for a used topic's unknown version)."""
    match = _TOPIC.match(topic)
    if match is None:
        raise errors.InvalidEvent(f"not a Qonto topic: {topic[:80]!r}")
    version, name = int(match.group(1)), match.group(2)
    if name not in USED:
        return Kind.IGNORED
    if version != USED[name]:
        raise errors.InvalidEvent(
            f"unknown version of a used topic: {topic} (this relay knows v{USED[name]})"
        )
    return {
        TRANSACTIONS: Kind.TRANSACTION,
        CLIENT_INVOICES: Kind.CLIENT_INVOICE,
        CONSENT_REVOCATIONS: Kind.CONSENT_REVOCATION,
    }[name]


def parse(body: bytes) -> Event:
    """Parse a webhook body into an Event (InvalidEvent when it is not a usable Qonto event)."""
    try:
        value = loads(body)
    except orjson.JSONDecodeError as exc:
        raise errors.InvalidEvent("not JSON") from exc
    if not isinstance(value, dict):
        raise errors.InvalidEvent("not a JSON object")
    event_id, topic = value.get("id"), value.get("type")
    if not isinstance(event_id, str) or not event_id or not isinstance(topic, str):
        raise errors.InvalidEvent("not a Qonto event (needs string id and type)")
    kind = classify(topic)
    data = value.get("data")
    if kind is not Kind.IGNORED:
        if not isinstance(data, dict):
            raise errors.InvalidEvent(f"{topic} event without a data object")
        if kind is not Kind.CONSENT_REVOCATION and not _text(data.get("id")):
            raise errors.InvalidEvent(f"{topic} event without data.id")
    return Event(
        id=event_id,
        topic=topic,
        kind=kind,
        organization_id=_text(value.get("organization_id")),
        created_at=timestamp(value.get("created_at")),
        data=data if isinstance(data, dict) else {},
    )


def _attachment_list(tx: dict[str, Any]) -> tuple[list[str], bool]:
    """Read the attachment ids a transaction names, and whether it names them all.

    Only a payload carrying the list (``attachment_ids``, or ``attachments`` objects with ids) is
    complete: one without it, or with entries this relay cannot read, says nothing about the
    attachments it does not name, so none of them may be taken as deleted.
    """
    listed = tx.get("attachment_ids")
    if isinstance(listed, list):
        ids = [a for a in listed if isinstance(a, str) and a]
        return ids, len(ids) == len(listed)
    attachments = tx.get("attachments")
    if listed is None and isinstance(attachments, list):
        ids = [
            a["id"]
            for a in attachments
            if isinstance(a, dict) and isinstance(a.get("id"), str) and a["id"]
        ]
        return ids, len(ids) == len(attachments)
    return [], False


def transaction_snapshot(tx: dict[str, Any], *, fallback: dt.datetime | None = None) -> Snapshot:
    """Take a snapshot of a transaction's files.

    It is complete (a file it no longer lists was deleted) only when the payload carries its
    attachment list.
    """
    attachment_ids, complete = _attachment_list(tx)
    side = tx.get("side")
    direction = models.Direction.SALE if side == "credit" else models.Direction.PURCHASE
    amount, currency = _amount(tx.get("amount"))
    document_date = _date(tx.get("settled_at")) or _date(tx.get("emitted_at"))
    counterparty = _text(tx.get("clean_counterparty_name")) or _text(tx.get("label"))
    currency = _text(tx.get("currency")) or currency
    ids = list(dict.fromkeys(attachment_ids))
    return Snapshot(
        source=models.Source.TRANSACTION,
        resource_id=str(tx["id"]),
        updated_at=timestamp(tx.get("updated_at")) or fallback,
        documents=tuple(
            DocumentSpec(a, direction, document_date, counterparty, amount, currency) for a in ids
        ),
        complete=complete,
    )


def supplier_invoice_snapshot(invoice: dict[str, Any]) -> Snapshot:
    """Take a snapshot of a supplier invoice, an accounting document whatever its status."""
    amount, currency = _amount(invoice.get("total_amount"))
    attachment_id = _text(invoice.get("attachment_id"))
    documents: tuple[DocumentSpec, ...] = ()
    if attachment_id:
        documents = (
            DocumentSpec(
                attachment_id=attachment_id,
                direction=models.Direction.PURCHASE,
                document_date=_date(invoice.get("issue_date")),
                counterparty=_text(invoice.get("supplier_name")),
                amount=amount,
                currency=currency,
                file_name=_text(invoice.get("file_name")),
            ),
        )
    return Snapshot(
        source=models.Source.SUPPLIER_INVOICE,
        resource_id=str(invoice["id"]),
        updated_at=timestamp(invoice.get("updated_at")),
        documents=documents,
        complete=False,
    )


def client_invoice_needs_fetch(invoice: dict[str, Any]) -> bool:
    """Tell whether an invoice has an exported status but no ``attachment_id``, to re-fetch it."""
    return invoice.get("status") in EXPORTED_CLIENT_INVOICE_STATUSES and not _text(
        invoice.get("attachment_id")
    )


def client_invoice_snapshot(
    invoice: dict[str, Any], *, fallback: dt.datetime | None = None
) -> Snapshot:
    """Take a client invoice's snapshot, an unpaid or paid one carrying a SALE document.

    Drafts and canceled invoices carry none.
    """
    documents: tuple[DocumentSpec, ...] = ()
    attachment_id = _text(invoice.get("attachment_id"))
    if invoice.get("status") in EXPORTED_CLIENT_INVOICE_STATUSES and attachment_id:
        amount, currency = _amount(invoice.get("total_amount"))
        client = invoice.get("client")
        counterparty = _text(client.get("name")) if isinstance(client, dict) else None
        documents = (
            DocumentSpec(
                attachment_id=attachment_id,
                direction=models.Direction.SALE,
                document_date=_date(invoice.get("issue_date")),
                counterparty=counterparty or _text(invoice.get("number")),
                amount=amount,
                currency=currency or _text(invoice.get("currency")),
            ),
        )
    return Snapshot(
        source=models.Source.CLIENT_INVOICE,
        resource_id=str(invoice["id"]),
        updated_at=timestamp(invoice.get("updated_at"))
        or timestamp(invoice.get("paid_at"))
        or fallback,
        documents=documents,
        complete=False,
    )
