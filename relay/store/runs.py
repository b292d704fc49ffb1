"""The ``runs`` table: scan + flush runs, a scheduled day claimed once whatever the schedulers."""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

from relay.store import db, queries


@dataclasses.dataclass(frozen=True, slots=True)
class Run:
    id: int
    started_at: dt.datetime
    finished_at: dt.datetime | None


async def claim_scheduled(conn: db.Executor, day: dt.date) -> int | None:
    """Insert the day's scheduled run; its id, or None when it exists already."""
    with db.translate("scheduler"):
        value = await conn.fetchval(queries.get("claim_scheduled_run"), day)
    return None if value is None else int(value)


async def get_scheduled(conn: db.Executor, day: dt.date) -> Run | None:
    """Read the day's scheduled run."""
    with db.translate("scheduler"):
        record = await conn.fetchrow(queries.get("get_scheduled_run"), day)
    return (
        None if record is None else Run(record["id"], record["started_at"], record["finished_at"])
    )


async def insert_manual(conn: db.Executor) -> int:
    """Insert a manual run; its id."""
    with db.translate("insert run"):
        return int(await conn.fetchval(queries.get("insert_manual_run")))


async def previous_start(conn: db.Executor, run_id: int) -> dt.datetime | None:
    """Read when the run before this one started (None for the first)."""
    with db.translate("previous run"):
        value: dt.datetime | None = await conn.fetchval(queries.get("previous_run_start"), run_id)
    return value


async def finish(conn: db.Executor, run_id: int, report: dict[str, Any]) -> None:
    """Record a run's end and its report."""
    with db.translate("finish run"):
        await conn.execute(queries.get("finish_run"), run_id, report)
