"""The ``uploads`` table, each attempt to deposit a document in Loop and its outcome."""

from __future__ import annotations

from collections.abc import Sequence

from relay.store import db, queries


async def start(conn: db.Executor, document_id: int, worker: int) -> int | None:
    """Commit an attempt (``sending``) while ``worker`` holds the document.

    Returns its id, or None when the worker no longer holds it (not its to send).
    """
    with db.translate("record attempt"):
        value = await conn.fetchval(queries.get("start_upload"), document_id, worker)
    return None if value is None else int(value)


async def finish(
    conn: db.Executor,
    upload_id: int,
    outcome: str,
    http_status: int | None,
    answer: object,
    error: str | None,
) -> None:
    """Record an attempt's outcome."""
    with db.translate("finish upload"):
        await conn.execute(
            queries.get("finish_upload"), upload_id, outcome, http_status, answer, error
        )


async def orphaned_attempts(conn: db.Executor, document_ids: Sequence[int]) -> dict[int, int]:
    """Map each document to its newest attempt still ``sending`` (it may have gone out)."""
    with db.translate("recover"):
        records = await conn.fetch(queries.get("orphaned_attempts"), list(document_ids))
    return {r["document_id"]: r["upload_id"] for r in records}
