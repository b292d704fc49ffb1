"""Documents as operators see them, in ``relay documents list`` and the admin API."""

from __future__ import annotations

import uuid

import asyncpg

from relay import errors, models
from relay.store import db, queries


async def list_documents(
    pool: asyncpg.Pool,
    *,
    connection_id: uuid.UUID | None = None,
    state: str | None = None,
    limit: int | None = None,
) -> list[models.Document]:
    """List every matching document, oldest first; no silent limit (``limit`` only when asked)."""
    if state is not None and state not in set(models.DocumentState):
        raise errors.Refused(
            f"unknown state {state!r}: expected one of {', '.join(models.DocumentState)}"
        )
    with db.translate("list documents"):
        records = await pool.fetch(queries.get("list_documents"), connection_id, state, limit)
    return [models.Document.from_record(r) for r in records]


async def get(pool: asyncpg.Pool, document_id: int) -> models.Document:
    with db.translate("get document"):
        record = await pool.fetchrow(queries.get("get_document"), document_id)
    if record is None:
        raise errors.NotFound(f"no document {document_id}")
    return models.Document.from_record(record)
