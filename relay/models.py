"""Rows as frozen dataclasses, which cross the ``db`` boundary instead of ``asyncpg.Record``."""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import uuid
from collections.abc import Mapping
from typing import Any, Self

import asyncpg

Row = Mapping[str, Any] | asyncpg.Record


class Source(enum.StrEnum):
    TRANSACTION = "transaction"
    SUPPLIER_INVOICE = "supplier_invoice"
    CLIENT_INVOICE = "client_invoice"


class Direction(enum.StrEnum):
    PURCHASE = "PURCHASE"
    SALE = "SALE"


class DocumentState(enum.StrEnum):
    PENDING = "pending"
    UPLOADING = "uploading"
    UPLOADED = "uploaded"
    SKIPPED = "skipped"
    FAILED = "failed"
    IN_DOUBT = "in_doubt"


class ConnectionState(enum.StrEnum):
    ACTIVE = "active"
    NEEDS_ATTENTION = "needs_attention"
    REVOKED = "revoked"
    DISCONNECTED = "disconnected"


# Reasons a document is skipped: stable strings, shown to operators and counted in reports.
SKIP_DELETED = "deleted before sync"
SKIP_UNSUPPORTED = "unsupported type"
SKIP_DUPLICATE = "duplicate content"
SKIP_TOO_LARGE = "too large"

MAX_UPLOAD_BYTES = 50 * 1024 * 1024


def _fields(cls: type[Any], record: Row) -> dict[str, Any]:
    return {f.name: record[f.name] for f in dataclasses.fields(cls) if f.name in record}


@dataclasses.dataclass(frozen=True, slots=True)
class Connection:
    """A connection without its secrets (those stay sealed until a client needs them)."""

    id: uuid.UUID
    client_name: str
    qonto_organization_id: str
    qonto_auth_kind: str
    cegid_dossier: str
    cegid_domain: str
    cegid_key_fingerprint: str
    state: str
    state_reason: str | None
    scan_since: dt.datetime
    transactions_scanned_to: dt.datetime | None
    supplier_invoices_scanned_to: dt.datetime | None
    client_invoices_scanned_to: dt.datetime | None
    dossier_checked_at: dt.datetime | None
    first_upload_at: dt.datetime | None
    created_at: dt.datetime
    updated_at: dt.datetime

    @classmethod
    def from_record(cls, record: Row) -> Self:
        return cls(**_fields(cls, record))

    def to_json(self) -> dict[str, Any]:
        return {
            "id": str(self.id),
            "client_name": self.client_name,
            "qonto_organization_id": self.qonto_organization_id,
            "qonto_auth_kind": self.qonto_auth_kind,
            "cegid_dossier": self.cegid_dossier,
            "cegid_domain": self.cegid_domain,
            "state": self.state,
            "state_reason": self.state_reason,
            "scan_since": _iso(self.scan_since),
            "transactions_scanned_to": _iso(self.transactions_scanned_to),
            "supplier_invoices_scanned_to": _iso(self.supplier_invoices_scanned_to),
            "client_invoices_scanned_to": _iso(self.client_invoices_scanned_to),
            "dossier_checked_at": _iso(self.dossier_checked_at),
            "first_upload_at": _iso(self.first_upload_at),
            "created_at": _iso(self.created_at),
            "updated_at": _iso(self.updated_at),
        }


@dataclasses.dataclass(frozen=True, slots=True)
class SealedCredentials:
    """The sealed (encrypted) secrets of one connection, as stored."""

    connection_id: uuid.UUID
    qonto_auth_kind: str
    qonto_credentials: bytes
    cegid_credentials: bytes


@dataclasses.dataclass(frozen=True, slots=True)
class Document:
    id: int
    connection_id: uuid.UUID
    source: str
    qonto_resource_id: str
    qonto_attachment_id: str
    direction: str
    state: str
    reason: str | None
    document_date: dt.date | None
    counterparty: str | None
    amount: str | None
    currency: str | None
    qonto_file_name: str | None
    file_name: str | None
    content_type: str | None
    size_bytes: int | None
    sha256: str | None
    attempts: int
    cegid_document_id: str | None
    uploaded_at: dt.datetime | None
    created_at: dt.datetime
    updated_at: dt.datetime

    @classmethod
    def from_record(cls, record: Row) -> Self:
        return cls(**_fields(cls, record))

    def to_json(self) -> dict[str, Any]:
        resource_key = {
            Source.TRANSACTION: "qonto_transaction_id",
            Source.SUPPLIER_INVOICE: "qonto_supplier_invoice_id",
            Source.CLIENT_INVOICE: "qonto_client_invoice_id",
        }[Source(self.source)]
        return {
            "id": self.id,
            "connection_id": str(self.connection_id),
            "source": self.source,
            "qonto_attachment_id": self.qonto_attachment_id,
            resource_key: self.qonto_resource_id,
            "direction": self.direction,
            "file_name": self.file_name or self.qonto_file_name,
            "sha256": self.sha256,
            "state": self.state,
            "reason": self.reason,
            "content_type": self.content_type,
            "size_bytes": self.size_bytes,
            "attempts": self.attempts,
            "cegid_document_id": self.cegid_document_id,
            "uploaded_at": _iso(self.uploaded_at),
            "document_date": self.document_date.isoformat() if self.document_date else None,
            "counterparty": self.counterparty,
            "amount": self.amount,
            "currency": self.currency,
            "created_at": _iso(self.created_at),
            "updated_at": _iso(self.updated_at),
        }


def _iso(value: dt.datetime | None) -> str | None:
    return value.isoformat() if value else None
