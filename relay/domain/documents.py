"""Documents as operators see them, in ``relay documents list`` and the admin API."""

from __future__ import annotations

import uuid

import asyncpg

from relay import errors, models, store


async def list_documents(
    pool: asyncpg.Pool,
    *,
    connection_id: uuid.UUID | None = None,
    state: str | None = None,
    limit: int | None = None,
) -> list[models.Document]:
    """List every matching document, oldest first, without a silent limit (``limit`` if asked)."""
    if state is not None and state not in set(models.DocumentState):
        raise errors.Refused(
            f"unknown state {state!r}: expected one of {', '.join(models.DocumentState)}"
        )
    return await store.documents.select(pool, connection_id, state, limit)


async def get(pool: asyncpg.Pool, document_id: int) -> models.Document:
    document = await store.documents.get(pool, document_id)
    if document is None:
        raise errors.NotFound(f"no document {document_id}")
    return document
