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


class Refuser(enum.StrEnum):
    """Who refused a connection's access, which decides the check that may clear its flag."""

    QONTO = "qonto"
    CEGID = "cegid"


class Reason(enum.StrEnum):
    """Why a document is in its state, what reports group by.

    The prose beside it is for display.
    """

    DELETED = "deleted"
    UNSUPPORTED_TYPE = "unsupported_type"  # detail: the file kind
    TOO_LARGE = "too_large"
    DUPLICATE_CONTENT = "duplicate_content"
    FILE_REFUSED = "file_refused"
    QONTO_DOWNLOAD_FAILED = "qonto_download_failed"
    CEGID_UNAVAILABLE = "cegid_unavailable"
    ACCESS_REFUSED = "access_refused"  # detail: the Refuser
    COPY_BEING_SENT = "copy_being_sent"
    IN_DOUBT = "in_doubt"
    FLUSH_STOPPED = "flush_stopped"
    FLUSH_ERROR = "flush_error"
    RESEND_REQUESTED = "resend_requested"
    RETRY_REQUESTED = "retry_requested"
    CONFIRMED_BY_OPERATOR = "confirmed_by_operator"
    OTHER = "other"  # prose from before reasons were codes that matched none of them


@dataclasses.dataclass(frozen=True, slots=True)
class Why:
    """A document's reason, with its code, the value qualifying it and the sentence shown."""

    code: Reason
    text: str
    detail: str | None = None


# How skipped documents' reasons begin: stable strings, shown to operators.
SKIP_DELETED = "deleted before sync"
SKIP_UNSUPPORTED = "unsupported type"
SKIP_DUPLICATE = "duplicate content"
SKIP_TOO_LARGE = "too large"
DELETED = Why(Reason.DELETED, SKIP_DELETED)

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
    refused_by: frozenset[Refuser] = frozenset()

    @classmethod
    def from_record(cls, record: Row) -> Self:
        values = _fields(cls, record)
        values["refused_by"] = frozenset(Refuser(r) for r in values.get("refused_by") or ())
        return cls(**values)

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
            "refused_by": sorted(self.refused_by),
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
    reason_code: str | None = None
    reason_detail: str | None = None

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
            "reason_code": self.reason_code,
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


@dataclasses.dataclass(frozen=True, slots=True)
class SealedValues:
    """A row's sealed secrets, in its table's column order (what a key rotation re-seals)."""

    id: Any  # a connection's or an invitation's uuid, a webhook secret's number
    values: tuple[bytes | None, ...]

    @classmethod
    def from_record(cls, record: Row) -> Self:
        values = list(record.values())
        return cls(values[0], tuple(None if v is None else bytes(v) for v in values[1:]))


@dataclasses.dataclass(frozen=True, slots=True)
class Invitation:
    """An invitation and the setup's progress (its secrets stay sealed, out of ``repr``).

    The progress is the Qonto consent (tokens sealed), then the Loop key and secret (sealed), the
    code dossier and domain, and a refusal met at Create, shown on the step it belongs to.
    """

    id: uuid.UUID
    client_name: str
    created_at: dt.datetime
    expires_at: dt.datetime
    used_at: dt.datetime | None
    connection_id: uuid.UUID | None
    qonto_organization_id: str | None
    qonto_organization_name: str | None
    qonto_role: str | None
    qonto_plan: str | None
    qonto_connected_at: dt.datetime | None
    cegid_dossier: str | None
    cegid_domain: str | None
    problem_step: str | None
    problem: str | None
    qonto_tokens: bytes | None = dataclasses.field(default=None, repr=False)
    cegid_credentials: bytes | None = dataclasses.field(default=None, repr=False)

    @classmethod
    def from_record(cls, record: Row) -> Self:
        values = {f.name: record[f.name] for f in dataclasses.fields(cls)}
        for name in ("qonto_tokens", "cegid_credentials"):
            if values[name] is not None:
                values[name] = bytes(values[name])
        return cls(**values)

    def usable(self, now: dt.datetime) -> bool:
        return self.used_at is None and self.expires_at > now

    @property
    def state(self) -> str:
        if self.used_at is not None:
            return "used"
        if self.expires_at <= dt.datetime.now(dt.UTC):
            return "expired"
        return "open"

    @property
    def qonto_done(self) -> bool:
        return self.qonto_tokens is not None and self.qonto_organization_id is not None

    @property
    def key_done(self) -> bool:
        return self.cegid_credentials is not None

    @property
    def dossier_done(self) -> bool:
        return bool(self.cegid_dossier and self.cegid_domain)

    def next_step(self) -> str:
        """Name the first step still to do, in the order qonto, key, dossier, hub (and Create)."""
        if not self.qonto_done:
            return "qonto"
        if not self.key_done:
            return "key"
        if not self.dossier_done:
            return "dossier"
        return "hub"

    def problem_on(self, step: str) -> str | None:
        return self.problem if self.problem_step == step else None

    def to_json(self) -> dict[str, Any]:
        """Show what an operator sees of an invitation (never its token or a secret)."""
        return {
            "id": str(self.id),
            "client_name": self.client_name,
            "state": self.state,
            "created_at": self.created_at.isoformat(),
            "expires_at": self.expires_at.isoformat(),
            "used_at": self.used_at.isoformat() if self.used_at else None,
            "connection_id": str(self.connection_id) if self.connection_id else None,
            "next_step": None if self.used_at else self.next_step(),
        }
