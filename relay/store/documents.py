"""The ``documents`` table, every Qonto attachment the relay knows of and its fate."""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from collections.abc import Sequence

from relay import models
from relay.store import db, queries


@dataclasses.dataclass(frozen=True, slots=True)
class NewDocument:
    """One file a snapshot names, as the consumer and the scan list it."""

    connection_id: uuid.UUID
    source: str
    resource_id: str
    attachment_id: str
    direction: str
    document_date: dt.date | None
    counterparty: str | None
    amount: str | None
    currency: str | None
    file_name: str | None


@dataclasses.dataclass(frozen=True, slots=True)
class StateCount:
    connection_id: uuid.UUID
    state: str
    n: int


@dataclasses.dataclass(frozen=True, slots=True)
class ReasonCount:
    code: models.Reason | None
    detail: str | None
    n: int


@dataclasses.dataclass(frozen=True, slots=True)
class Orphan:
    """A document left ``uploading`` by a worker, locked by the caller's transaction."""

    id: int
    connection_id: uuid.UUID


def _columns(rows: Sequence[NewDocument]) -> list[list[object]]:
    return [
        [r.connection_id for r in rows],
        [r.source for r in rows],
        [r.resource_id for r in rows],
        [r.attachment_id for r in rows],
        [r.direction for r in rows],
        [r.document_date for r in rows],
        [r.counterparty for r in rows],
        [r.amount for r in rows],
        [r.currency for r in rows],
        [r.file_name for r in rows],
    ]


async def select(
    conn: db.Executor, connection_id: uuid.UUID | None, state: str | None, limit: int | None
) -> list[models.Document]:
    """List documents in id order, of one connection and one state when given."""
    with db.translate("list documents"):
        records = await conn.fetch(queries.get("list_documents"), connection_id, state, limit)
    return [models.Document.from_record(r) for r in records]


async def get(conn: db.Executor, document_id: int) -> models.Document | None:
    """Read one document (None when there is no such id)."""
    with db.translate("get document"):
        record = await conn.fetchrow(queries.get("get_document"), document_id)
    return None if record is None else models.Document.from_record(record)


async def state_of(conn: db.Executor, document_id: int) -> str | None:
    """Read one document's state (None when there is no such id)."""
    with db.translate("read document"):
        value = await conn.fetchval(queries.get("document_state"), document_id)
    return None if value is None else str(value)


async def count_by_state(conn: db.Executor, connection_id: uuid.UUID | None) -> list[StateCount]:
    """Count documents per connection and state (of one connection when given)."""
    with db.translate("count documents"):
        records = await conn.fetch(queries.get("count_documents_by_state"), connection_id)
    return [StateCount(r["connection_id"], r["state"], r["n"]) for r in records]


async def insert_pending(conn: db.Executor, rows: Sequence[NewDocument]) -> int:
    """Add a pending document per new file, returning how many (a skipped one comes back)."""
    with db.translate("insert documents"):
        records = await conn.fetch(queries.get("insert_documents"), *_columns(rows))
    return len(records)


async def insert_named(
    conn: db.Executor, rows: Sequence[NewDocument], deleted: models.Why
) -> list[str]:
    """List files only older snapshots named, and return the states of the ones added.

    They are skipped when the newest snapshot leaves them out.
    """
    with db.translate("insert named documents"):
        records = await conn.fetch(
            queries.get("insert_named_documents"), *_columns(rows), deleted.text, deleted.code
        )
    return [r["state"] for r in records]


async def skip_removed(
    conn: db.Executor,
    resources: Sequence[tuple[uuid.UUID, str, str]],
    kept: Sequence[tuple[uuid.UUID, str]],
    why: models.Why,
) -> int:
    """Skip pending documents that complete snapshots no longer list, returning how many."""
    with db.translate("skip removed attachments"):
        status: str = await conn.execute(
            queries.get("skip_removed_attachments"),
            [r[0] for r in resources],
            [r[1] for r in resources],
            [r[2] for r in resources],
            [k[0] for k in kept],
            [k[1] for k in kept],
            why.text,
            why.code,
        )
    return int(status.split()[-1])


async def claim(
    conn: db.Executor, connection_id: uuid.UUID, worker: int, limit: int, cutoff: dt.datetime
) -> list[models.Document]:
    """Take up to ``limit`` pending documents of a connection for ``worker`` (uploading)."""
    with db.translate("claim documents"):
        records = await conn.fetch(
            queries.get("claim_documents"), connection_id, worker, limit, cutoff
        )
    return [models.Document.from_record(r) for r in records]


async def held(
    conn: db.Executor, connection_id: uuid.UUID, worker: int, seen: Sequence[int], limit: int
) -> list[models.Document]:
    """Read what ``worker`` holds of a connection outside ``seen`` (a claim whose answer was lost)."""
    with db.translate("claim documents"):
        records = await conn.fetch(
            queries.get("held_documents"), connection_id, worker, list(seen), limit
        )
    return [models.Document.from_record(r) for r in records]


async def finish(
    conn: db.Executor, document_id: int, state: str, why: models.Why, worker: int
) -> bool:
    """Settle a document ``worker`` holds, or return False when it no longer holds it."""
    with db.translate("finish document"):
        status: str = await conn.execute(
            queries.get("finish_document"),
            document_id,
            state,
            why.text,
            worker,
            why.code,
            why.detail,
        )
    return status != "UPDATE 0"


async def mark_uploaded(
    conn: db.Executor,
    document_id: int,
    cegid_document_id: str | None,
    worker: int,
    upload_id: int,
    http_status: int,
    answer: object,
) -> bool:
    """Record Loop's 2xx, marking the attempt and the document uploaded.

    Returns False when the document is neither held nor in doubt any more.
    """
    with db.translate("document uploaded"):
        status: str = await conn.execute(
            queries.get("mark_uploaded"),
            document_id,
            cegid_document_id,
            worker,
            upload_id,
            http_status,
            answer,
        )
    return status != "UPDATE 0"


async def resolve(
    conn: db.Executor, document_id: int, state: str, why: models.Why
) -> models.Document | None:
    """Settle an in-doubt document as an operator decided (None when it is no longer in doubt)."""
    with db.translate("resolve document"):
        record = await conn.fetchrow(
            queries.get("resolve_document"), document_id, state, why.text, why.code
        )
    return None if record is None else models.Document.from_record(record)


async def uploading_workers(conn: db.Executor) -> list[int]:
    """List the workers holding documents (uploading)."""
    with db.translate("recover"):
        records = await conn.fetch(queries.get("uploading_workers"))
    return [int(r["claimed_by"]) for r in records]


async def orphaned(conn: db.Executor, worker: int) -> list[Orphan]:
    """Lock the documents ``worker`` left uploading (in the caller's transaction)."""
    with db.translate("recover"):
        records = await conn.fetch(queries.get("orphaned_documents"), worker)
    return [Orphan(r["id"], r["connection_id"]) for r in records]


async def skipped_since(
    conn: db.Executor, connection_id: uuid.UUID, since: dt.datetime
) -> list[ReasonCount]:
    """Count a connection's documents skipped since ``since``, per reason."""
    with db.translate("skipped since"):
        records = await conn.fetch(queries.get("skipped_since"), connection_id, since)
    return [
        ReasonCount(
            None if r["reason_code"] is None else models.Reason(r["reason_code"]),
            r["reason_detail"],
            r["n"],
        )
        for r in records
    ]
