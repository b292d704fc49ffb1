"""The ``heartbeats`` table, one row per running role, rewritten at every beat."""

from __future__ import annotations

import dataclasses
import uuid

from relay.domain import stalls
from relay.store import db, queries


@dataclasses.dataclass(frozen=True, slots=True)
class Beat:
    """One beat as a role reports it, its ages in seconds turned into the database's clock."""

    id: uuid.UUID
    role: str
    command: str
    host: str
    pid: int
    running_s: float
    interval_s: float
    work_unit: str
    work_done: int
    work_age_s: float | None
    subscribed: bool | None
    in_hand: int | None
    oldest_held_ms: int | None
    waiting_s: float | None
    stop_reason: str | None


async def beat(conn: db.Executor, row: Beat) -> None:
    """Write one beat (the row is created by the first)."""
    with db.translate("heartbeat"):
        await conn.execute(
            queries.get("heartbeat"), *(getattr(row, f.name) for f in dataclasses.fields(Beat))
        )


async def prune(conn: db.Executor, older_than_s: float) -> None:
    """Delete the rows of roles stopped or dead for that long."""
    with db.translate("heartbeat"):
        await conn.execute(queries.get("prune_heartbeats"), older_than_s)


async def recent(conn: db.Executor, within_s: float) -> list[stalls.Role]:
    """List the rows that beat within ``within_s``, their ages on the database's clock."""
    with db.translate("status"):
        records = await conn.fetch(queries.get("list_heartbeats"), within_s)
    return [stalls.Role.from_record(r) for r in records]
