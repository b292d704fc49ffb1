"""The ``events`` table, every Qonto event received, keyed by connection and event id (dedupe)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from collections.abc import Sequence

from relay.store import db, queries


@dataclasses.dataclass(frozen=True, slots=True)
class NewEvent:
    connection_id: uuid.UUID
    event_id: str
    topic: str
    outcome: str
    qonto_created_at: dt.datetime | None
    payload: str  # JSON text


async def insert(conn: db.Executor, rows: Sequence[NewEvent]) -> set[tuple[uuid.UUID, str]]:
    """Record events and return the (connection, event id) of the ones not seen before."""
    with db.translate("insert events"):
        records = await conn.fetch(
            queries.get("insert_events"),
            [r.connection_id for r in rows],
            [r.event_id for r in rows],
            [r.topic for r in rows],
            [r.outcome for r in rows],
            [r.qonto_created_at for r in rows],
            [r.payload for r in rows],
        )
    return {(r["connection_id"], r["event_id"]) for r in records}


async def set_outcomes(conn: db.Executor, outcomes: Sequence[tuple[uuid.UUID, str, str]]) -> None:
    """Rewrite the outcome of events given as (connection, event id, outcome)."""
    with db.translate("set event outcomes"):
        await conn.execute(
            queries.get("set_event_outcomes"),
            [o[0] for o in outcomes],
            [o[1] for o in outcomes],
            [o[2] for o in outcomes],
        )


async def count(conn: db.Executor) -> int:
    """Count the events recorded, every connection together."""
    with db.translate("count events"):
        return int(await conn.fetchval(queries.get("count_events")))
