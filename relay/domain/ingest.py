"""Qonto resource snapshots turned into documents, for the webhooks and the daily scan alike.

:func:`apply` runs in the caller's transaction, a whole batch in a handful of statements, each a
named step. A client invoice that was paid (or unpaid) and later becomes canceled keeps its
document, even while pending: a cancellation is booked as a credit note of its own in Qonto.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Sequence
from typing import Final

import orjson

from relay import events, models, store
from relay.store import db

APPLIED: Final = "applied"
STALE: Final = "stale"
NOT_A_DOCUMENT: Final = "not_a_document"  # the consumer's outcome for a draft or canceled invoice


@dataclasses.dataclass(frozen=True, slots=True)
class Applied:
    applied: frozenset[tuple[uuid.UUID, str, str]]  # (connection, source, resource id)
    stale: frozenset[tuple[uuid.UUID, str, str]]
    created: int
    skipped: int
    # "applied", or "stale" when every snapshot given was older than the one recorded
    outcome: str = APPLIED


Key = tuple[uuid.UUID, str, str]  # (connection, source, resource id)
# the files to make documents of, one per (connection, attachment): the resource and the file
Files = dict[tuple[uuid.UUID, str], tuple[Key, events.DocumentSpec]]


async def apply(conn: db.Conn, items: Sequence[tuple[uuid.UUID, events.Snapshot]]) -> Applied:
    """Apply snapshots in the caller's transaction, idempotently.

    The result is the same whatever the order and the batches they come in.
    """
    newest, told = _newest(items)
    if not newest:
        return Applied(frozenset(), frozenset(), 0, 0)
    keys = list(newest)
    applied = await store.resources.upsert(
        conn,
        [store.resources.Newest(k, newest[k].updated_at, _listed(newest[k])) for k in keys],
    )
    pending = _files_of_newest(newest, applied)
    created = await _insert_pending(conn, pending)
    skipped = await _skip_removed(conn, newest, applied)
    listed, listed_skipped = await _list_older_files(
        conn, _files_only_older(newest, told, applied, pending)
    )
    return Applied(
        applied=frozenset(applied),
        stale=frozenset(set(keys) - applied),
        created=created + listed,
        skipped=skipped + listed_skipped,
        outcome=APPLIED if applied else STALE,
    )


def _newest(
    items: Sequence[tuple[uuid.UUID, events.Snapshot]],
) -> tuple[dict[Key, events.Snapshot], dict[Key, list[events.Snapshot]]]:
    """Pick each resource's newest snapshot (Qonto does not promise order), and every one given."""
    newest: dict[Key, events.Snapshot] = {}
    told: dict[Key, list[events.Snapshot]] = {}
    for connection_id, snapshot in items:
        key = (connection_id, str(snapshot.source), snapshot.resource_id)
        told.setdefault(key, []).append(snapshot)
        held = newest.get(key)
        if held is None or _newer_or_equal(snapshot, held):
            newest[key] = snapshot
    return newest, told


def _files_of_newest(newest: dict[Key, events.Snapshot], applied: set[Key]) -> Files:
    """Read the files of the snapshots recorded as their resource's newest."""
    files: Files = {}
    for key, snapshot in newest.items():
        if key in applied:
            for spec in snapshot.documents:
                files.setdefault((key[0], spec.attachment_id), (key, spec))
    return files


async def _insert_pending(conn: db.Conn, files: Files) -> int:
    """Insert a ``pending`` document for each file, once per connection and attachment.

    One that exists keeps its state; one skipped as deleted comes back. Returns how many are new.
    """
    if not files:
        return 0
    return await store.documents.insert_pending(conn, [_new(k, s) for k, s in files.values()])


async def _skip_removed(
    conn: db.Conn, newest: dict[Key, events.Snapshot], applied: set[Key]
) -> int:
    """Skip as deleted the pending documents a complete newest snapshot no longer lists.

    Their reason is "deleted before sync"; a snapshot is complete when it lists all its
    attachments (a transaction's does). An uploaded document stays uploaded.
    """
    complete = [k for k in newest if k in applied and newest[k].complete]
    if not complete:
        return 0
    kept = [(k[0], s.attachment_id) for k in complete for s in newest[k].documents]
    return await store.documents.skip_removed(conn, complete, kept, models.DELETED)


def _files_only_older(
    newest: dict[Key, events.Snapshot],
    told: dict[Key, list[events.Snapshot]],
    applied: set[Key],
    pending: Files,
) -> Files:
    """Find the files only older snapshots named (stale ones, or ones the batch superseded)."""
    files: Files = {}
    for key, snapshots in told.items():
        for snapshot in snapshots:
            if key in applied and snapshot is newest[key]:
                continue  # its files are the pending ones
            for spec in snapshot.documents:
                if (key[0], spec.attachment_id) not in pending:
                    files.setdefault((key[0], spec.attachment_id), (key, spec))
    return files


async def _list_older_files(conn: db.Conn, files: Files) -> tuple[int, int]:
    """Add a document for each file only an older snapshot named, whatever the batches' order.

    It is skipped as deleted when the newest snapshot lists its files and leaves it out, pending
    otherwise (one that exists keeps its state). Returns (new pending, new skipped).
    """
    if not files:
        return 0, 0
    states = await store.documents.insert_named(
        conn, [_new(k, s) for k, s in files.values()], models.DELETED
    )
    skipped = sum(1 for state in states if state == models.DocumentState.SKIPPED)
    return len(states) - skipped, skipped


def _new(key: tuple[uuid.UUID, str, str], spec: events.DocumentSpec) -> store.documents.NewDocument:
    return store.documents.NewDocument(
        connection_id=key[0],
        source=key[1],
        resource_id=key[2],
        attachment_id=spec.attachment_id,
        direction=str(spec.direction),
        document_date=spec.document_date,
        counterparty=spec.counterparty,
        amount=spec.amount,
        currency=spec.currency,
        file_name=spec.file_name,
    )


def _listed(snapshot: events.Snapshot) -> str | None:
    """Return a complete snapshot's attachment ids as a JSON array, None for an incomplete one."""
    if not snapshot.complete:
        return None
    return orjson.dumps([s.attachment_id for s in snapshot.documents]).decode()


def _newer_or_equal(candidate: events.Snapshot, held: events.Snapshot) -> bool:
    if candidate.updated_at is None or held.updated_at is None:
        return True
    return candidate.updated_at >= held.updated_at
