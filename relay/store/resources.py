"""The ``resources`` table, the newest snapshot applied per Qonto resource and its files."""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from collections.abc import Sequence

from relay.store import db, queries

Key = tuple[uuid.UUID, str, str]  # (connection, source, resource id)


@dataclasses.dataclass(frozen=True, slots=True)
class Newest:
    """A resource's newest snapshot in a batch."""

    key: Key
    updated_at: dt.datetime | None
    attachment_ids: str | None  # its complete list of files as a JSON array; None: not listed


async def upsert(conn: db.Executor, rows: Sequence[Newest]) -> set[Key]:
    """Record each snapshot unless a newer one is, returning the keys of the ones applied."""
    with db.translate("apply snapshots"):
        records = await conn.fetch(
            queries.get("upsert_resources"),
            [r.key[0] for r in rows],
            [r.key[1] for r in rows],
            [r.key[2] for r in rows],
            [r.updated_at for r in rows],
            [r.attachment_ids for r in rows],
        )
    return {(r["connection_id"], r["source"], r["resource_id"]) for r in records}
