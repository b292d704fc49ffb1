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

:func:`apply` takes a whole batch (the consumer, the scanner's pages); :func:`apply_transaction`,
:func:`apply_supplier_invoice` and :func:`apply_client_invoice` take one Qonto resource as the API
shows it and say what became of it.

A client invoice that was paid (or unpaid) and later becomes canceled keeps its document, even while
it is still pending: it was an accounting document when it was issued, and a cancellation is booked
as a credit note of its own in Qonto, not by deleting the invoice's file.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from collections.abc import Sequence
from typing import Any, Final

import orjson

from relay import errors, events, models, store
from relay.store import db

APPLIED: Final = "applied"
STALE: Final = "stale"
NOT_A_DOCUMENT: Final = "not_a_document"


class NeedsAttachment(errors.RelayError):
    """An unpaid or paid client invoice given without ``attachment_id``: fetch it, apply it again."""

    def __init__(self, invoice_id: str) -> None:
        super().__init__(f"client invoice {invoice_id} has no attachment_id: fetch it from Qonto")
        self.invoice_id = invoice_id


@dataclasses.dataclass(frozen=True, slots=True)
class Applied:
    applied: frozenset[tuple[uuid.UUID, str, str]]  # (connection, source, resource id)
    stale: frozenset[tuple[uuid.UUID, str, str]]
    created: int
    skipped: int
    # "applied", or "stale" when every snapshot given was older than the one recorded; the
    # one-resource functions also say "not_a_document" (a draft or canceled client invoice)
    outcome: str = APPLIED


Key = tuple[uuid.UUID, str, str]  # (connection, source, resource id)
# the files to make documents of, one per (connection, attachment): the resource and the file
Files = dict[tuple[uuid.UUID, str], tuple[Key, events.DocumentSpec]]


async def apply(conn: db.Conn, items: Sequence[tuple[uuid.UUID, events.Snapshot]]) -> Applied:
    """Apply snapshots in the caller's transaction; idempotent, and the same whatever the order
    and the batches they come in."""
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
    """Each resource's newest snapshot, and every snapshot given of it."""
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
    """The files of the snapshots recorded as their resource's newest."""
    files: Files = {}
    for key, snapshot in newest.items():
        if key in applied:
            for spec in snapshot.documents:
                files.setdefault((key[0], spec.attachment_id), (key, spec))
    return files


async def _insert_pending(conn: db.Conn, files: Files) -> int:
    """A ``pending`` document for each file (one that exists keeps its state); how many new."""
    if not files:
        return 0
    return await store.documents.insert_pending(conn, [_new(k, s) for k, s in files.values()])


async def _skip_removed(
    conn: db.Conn, newest: dict[Key, events.Snapshot], applied: set[Key]
) -> int:
    """Skip as deleted the pending documents a complete newest snapshot no longer lists."""
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
    """The files only older snapshots named (stale ones, or ones the batch superseded)."""
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
    """A document for each file only an older snapshot named, listed against the newest one now
    recorded (skipped as deleted when it leaves the file out); (new pending, new skipped)."""
    if not files:
        return 0, 0
    states = await store.documents.insert_named(
        conn, [_new(k, s) for k, s in files.values()], models.DELETED
    )
    skipped = sum(1 for state in states if state == models.DocumentState.SKIPPED)
    return len(states) - skipped, skipped


async def apply_transaction(
    conn: db.Conn,
    connection_id: uuid.UUID,
    tx: dict[str, Any],
    *,
    fallback: dt.datetime | None = None,
) -> Applied:
    """One transaction: a pending document per attachment, the ones it no longer lists skipped.

    ``fallback`` (the webhook envelope's ``created_at``) orders snapshots without ``updated_at``.
    """
    snapshot = events.transaction_snapshot(tx, fallback=fallback)
    return await apply(conn, [(connection_id, snapshot)])


async def apply_supplier_invoice(
    conn: db.Conn, connection_id: uuid.UUID, invoice: dict[str, Any]
) -> Applied:
    """One supplier invoice, whatever its status: a PURCHASE document for its file."""
    return await apply(conn, [(connection_id, events.supplier_invoice_snapshot(invoice))])


async def apply_client_invoice(
    conn: db.Conn,
    connection_id: uuid.UUID,
    invoice: dict[str, Any],
    *,
    fallback: dt.datetime | None = None,
) -> Applied:
    """One client invoice: unpaid or paid is a SALE document; a draft or canceled one is none.

    Raise NeedsAttachment when an unpaid or paid invoice comes without ``attachment_id`` (the
    webhook payload omits it): the caller fetches the invoice and applies that.
    """
    if events.client_invoice_needs_fetch(invoice):
        raise NeedsAttachment(str(invoice.get("id")))
    snapshot = events.client_invoice_snapshot(invoice, fallback=fallback)
    result = await apply(conn, [(connection_id, snapshot)])
    if result.outcome == APPLIED and not snapshot.documents:
        return dataclasses.replace(result, outcome=NOT_A_DOCUMENT)
    return result


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
