"""The console's reads, and the operator's retry of a failed document.

The console reads connections with their last deposits, document counts, and one page of a
connection's documents by keyset.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from typing import Any, Self

import asyncpg

from relay import models
from relay.store import db, documents, queries


@dataclasses.dataclass(frozen=True, slots=True)
class ConnectionRow:
    """A connection (no secrets) with its last deposit and its first since the (re)connection."""

    connection: models.Connection
    connected_at: dt.datetime
    last_deposit_at: dt.datetime | None
    first_deposit_at: dt.datetime | None

    @classmethod
    def from_record(cls, record: models.Row) -> Self:
        return cls(
            connection=models.Connection.from_record(record),
            connected_at=record["connected_at"],
            last_deposit_at=record["last_deposit_at"],
            first_deposit_at=record["first_deposit_at"],
        )


@dataclasses.dataclass(frozen=True, slots=True)
class DocumentRow:
    """A document as a console page shows it, with its last upload attempt's answer."""

    document: models.Document
    last_http_status: int | None
    last_cegid_answer: Any
    last_error: str | None

    @classmethod
    def from_record(cls, record: models.Row) -> Self:
        return cls(
            document=models.Document.from_record(record),
            last_http_status=record["last_http_status"],
            last_cegid_answer=record["last_cegid_answer"],
            last_error=record["last_error"],
        )


@dataclasses.dataclass(frozen=True, slots=True)
class DocumentFilter:
    """Which of a connection's documents a page lists, by state, source and file name."""

    state: str | None = None
    source: str | None = None
    search: str | None = None

    def pattern(self) -> str | None:
        """Return the ILIKE pattern of the search (its wildcards taken literally)."""
        if not self.search:
            return None
        escaped = self.search.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        return f"%{escaped}%"


async def connections(pool: asyncpg.Pool) -> list[ConnectionRow]:
    with db.translate("list connections"):
        records = await pool.fetch(queries.get("console_connections"))
    return [ConnectionRow.from_record(r) for r in records]


async def connection(pool: asyncpg.Pool, connection_id: uuid.UUID) -> ConnectionRow | None:
    with db.translate("read connection"):
        record = await pool.fetchrow(queries.get("console_connection"), connection_id)
    return None if record is None else ConnectionRow.from_record(record)


async def counts(
    pool: asyncpg.Pool, connection_id: uuid.UUID | None = None
) -> dict[uuid.UUID, dict[str, int]]:
    """Count documents by state for each connection (one aggregate, no document loaded)."""
    found: dict[uuid.UUID, dict[str, int]] = {}
    for row in await documents.count_by_state(pool, connection_id):
        found.setdefault(row.connection_id, {})[row.state] = int(row.n)
    return found


async def documents_page(
    pool: asyncpg.Pool,
    connection_id: uuid.UUID,
    which: DocumentFilter,
    *,
    before: int | None,
    limit: int,
) -> list[DocumentRow]:
    """Read up to ``limit`` documents, newest first, with ids below ``before`` when given."""
    with db.translate("list documents"):
        records = await pool.fetch(
            queries.get("console_documents_page"),
            connection_id,
            which.state,
            which.source,
            which.pattern(),
            before,
            limit,
        )
    return [DocumentRow.from_record(r) for r in records]


async def retry_document(
    pool: asyncpg.Pool, document_id: int, why: models.Why
) -> models.Document | None:
    """Put a failed document back to pending (None when it is not, or no longer, failed)."""
    with db.translate("retry document"):
        record = await pool.fetchrow(queries.get("retry_document"), document_id, why.text, why.code)
    return None if record is None else models.Document.from_record(record)


async def revoke_invitation(pool: asyncpg.Pool, invitation_id: uuid.UUID) -> str | None:
    """Expire an open invitation now and return its client's name (None when it was not open)."""
    with db.translate("revoke invitation"):
        name = await pool.fetchval(queries.get("revoke_invitation"), invitation_id)
    return None if name is None else str(name)
