"""The one place where Qonto resource snapshots become documents (webhooks and the daily scan alike).

Runs inside the caller's transaction, a whole batch in a handful of statements:
1. each resource's newest snapshot is recorded in ``resources``; an older one (Qonto does not promise
   order) changes nothing and is reported stale;
2. each file of an applied snapshot becomes a ``pending`` document, once per connection and
   attachment (a document skipped as deleted comes back if its attachment reappears);
3. for transactions, which list all their attachments, a pending document whose attachment is no
   longer listed becomes ``skipped`` ("deleted before sync"); an uploaded one stays uploaded.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Sequence

from relay import db, events, models, queries


@dataclasses.dataclass(frozen=True, slots=True)
class Applied:
    applied: frozenset[tuple[uuid.UUID, str, str]]  # (connection, source, resource id)
    stale: frozenset[tuple[uuid.UUID, str, str]]
    created: int
    skipped: int


async def apply(conn: db.Conn, items: Sequence[tuple[uuid.UUID, events.Snapshot]]) -> Applied:
    """Apply snapshots in the caller's transaction; idempotent, order-insensitive."""
    newest: dict[tuple[uuid.UUID, str, str], events.Snapshot] = {}
    for connection_id, snapshot in items:
        key = (connection_id, str(snapshot.source), snapshot.resource_id)
        held = newest.get(key)
        if held is None or _newer_or_equal(snapshot, held):
            newest[key] = snapshot
    if not newest:
        return Applied(frozenset(), frozenset(), 0, 0)
    keys = list(newest)
    with db.translate("apply snapshots"):
        records = await conn.fetch(
            queries.get("upsert_resources"),
            [k[0] for k in keys],
            [k[1] for k in keys],
            [k[2] for k in keys],
            [newest[k].updated_at for k in keys],
        )
        applied = {(r["connection_id"], r["source"], r["resource_id"]) for r in records}
        unique: dict[
            tuple[uuid.UUID, str], tuple[tuple[uuid.UUID, str, str], events.DocumentSpec]
        ] = {}
        for key in keys:
            if key in applied:
                for spec in newest[key].documents:
                    unique.setdefault((key[0], spec.attachment_id), (key, spec))
        rows = list(unique.values())
        created = 0
        if rows:
            created = len(
                await conn.fetch(
                    queries.get("insert_documents"),
                    [k[0] for k, _ in rows],
                    [k[1] for k, _ in rows],
                    [k[2] for k, _ in rows],
                    [s.attachment_id for _, s in rows],
                    [str(s.direction) for _, s in rows],
                    [s.document_date for _, s in rows],
                    [s.counterparty for _, s in rows],
                    [s.amount for _, s in rows],
                    [s.currency for _, s in rows],
                    [s.file_name for _, s in rows],
                    models.SKIP_DELETED,
                )
            )
        complete = [k for k in keys if k in applied and newest[k].complete]
        skipped = 0
        if complete:
            kept = [(k[0], s.attachment_id) for k in complete for s in newest[k].documents]
            status = await conn.execute(
                queries.get("skip_removed_attachments"),
                [k[0] for k in complete],
                [k[1] for k in complete],
                [k[2] for k in complete],
                [c for c, _ in kept],
                [a for _, a in kept],
                models.SKIP_DELETED,
            )
            skipped = int(status.split()[-1])
    return Applied(
        applied=frozenset(applied),
        stale=frozenset(set(keys) - applied),
        created=created,
        skipped=skipped,
    )


def _newer_or_equal(candidate: events.Snapshot, held: events.Snapshot) -> bool:
    if candidate.updated_at is None or held.updated_at is None:
        return True
    return candidate.updated_at >= held.updated_at
