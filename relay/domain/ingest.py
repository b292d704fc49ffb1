"""The one place where Qonto resource snapshots become documents (webhooks and the daily scan alike).

Runs inside the caller's transaction, a whole batch in a handful of statements:
1. each resource's newest snapshot is recorded in ``resources``, with its complete list of files
   when it carries one; an older one (Qonto does not promise order) is reported stale;
2. each file of an applied snapshot becomes a ``pending`` document, once per connection and
   attachment (a document skipped as deleted comes back if its attachment reappears);
3. for transactions, which list all their attachments, a pending document whose attachment is no
   longer listed becomes ``skipped`` ("deleted before sync"); an uploaded one stays uploaded;
4. every file the relay is told about is listed, whatever the batches and their order: a file
   that only an older snapshot names (a stale one, or one the same batch superseded) becomes a
   document too, ``skipped`` ("deleted before sync") when the newest snapshot lists its files and
   leaves it out, ``pending`` otherwise; a document that exists keeps its state.

:func:`apply` takes a whole batch (the consumer, the scanner's pages) and says what became of it.

A client invoice that was paid (or unpaid) and later becomes canceled keeps its document, even while
it is still pending: it was an accounting document when it was issued, and a cancellation is booked
as a credit note of its own in Qonto, not by deleting the invoice's file.
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


async def apply(conn: db.Conn, items: Sequence[tuple[uuid.UUID, events.Snapshot]]) -> Applied:
    """Apply snapshots in the caller's transaction; idempotent, and the same whatever the order
    and the batches they come in."""
    newest: dict[tuple[uuid.UUID, str, str], events.Snapshot] = {}
    told: dict[tuple[uuid.UUID, str, str], list[events.Snapshot]] = {}
    for connection_id, snapshot in items:
        key = (connection_id, str(snapshot.source), snapshot.resource_id)
        told.setdefault(key, []).append(snapshot)
        held = newest.get(key)
        if held is None or _newer_or_equal(snapshot, held):
            newest[key] = snapshot
    if not newest:
        return Applied(frozenset(), frozenset(), 0, 0)
    keys = list(newest)
    applied = await store.resources.upsert(
        conn,
        [store.resources.Newest(k, newest[k].updated_at, _listed(newest[k])) for k in keys],
    )
    unique: dict[tuple[uuid.UUID, str], tuple[tuple[uuid.UUID, str, str], events.DocumentSpec]] = {}
    for key in keys:
        if key in applied:
            for spec in newest[key].documents:
                unique.setdefault((key[0], spec.attachment_id), (key, spec))
    created = 0
    if unique:
        created = await store.documents.insert_pending(
            conn, [_new(k, s) for k, s in unique.values()]
        )
    complete = [k for k in keys if k in applied and newest[k].complete]
    skipped = 0
    if complete:
        kept = [(k[0], s.attachment_id) for k in complete for s in newest[k].documents]
        skipped = await store.documents.skip_removed(conn, complete, kept, models.DELETED)
    # the files only older snapshots named, listed against the newest one now recorded
    others: dict[tuple[uuid.UUID, str], tuple[tuple[uuid.UUID, str, str], events.DocumentSpec]] = {}
    for key in keys:
        for snapshot in told[key]:
            if key in applied and snapshot is newest[key]:
                continue  # its files are the pending ones above
            for spec in snapshot.documents:
                if (key[0], spec.attachment_id) not in unique:
                    others.setdefault((key[0], spec.attachment_id), (key, spec))
    if others:
        states = await store.documents.insert_named(
            conn, [_new(k, s) for k, s in others.values()], models.DELETED
        )
        listed_skipped = sum(1 for state in states if state == models.DocumentState.SKIPPED)
        created += len(states) - listed_skipped
        skipped += listed_skipped
    return Applied(
        applied=frozenset(applied),
        stale=frozenset(set(keys) - applied),
        created=created,
        skipped=skipped,
        outcome=APPLIED if applied else STALE,
    )


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
    """A complete snapshot's attachment ids as a JSON array; None when it does not list them all."""
    if not snapshot.complete:
        return None
    return orjson.dumps([s.attachment_id for s in snapshot.documents]).decode()


def _newer_or_equal(candidate: events.Snapshot, held: events.Snapshot) -> bool:
    if candidate.updated_at is None or held.updated_at is None:
        return True
    return candidate.updated_at >= held.updated_at
