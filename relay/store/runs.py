"""The ``runs`` table of scan + flush runs (a scheduled day claimed once, lists for the console)."""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any, Self

from relay import models
from relay.store import db, queries


@dataclasses.dataclass(frozen=True, slots=True)
class ScheduledRun:
    """A scheduled day's run, as the scheduler checks it."""

    id: int
    started_at: dt.datetime
    finished_at: dt.datetime | None


async def claim_scheduled(conn: db.Executor, day: dt.date) -> int | None:
    """Insert the day's scheduled run and return its id (None when it exists already)."""
    with db.translate("scheduler"):
        value = await conn.fetchval(queries.get("claim_scheduled_run"), day)
    return None if value is None else int(value)


async def get_scheduled(conn: db.Executor, day: dt.date) -> ScheduledRun | None:
    """Read the day's scheduled run."""
    with db.translate("scheduler"):
        record = await conn.fetchrow(queries.get("get_scheduled_run"), day)
    return (
        None
        if record is None
        else ScheduledRun(record["id"], record["started_at"], record["finished_at"])
    )


async def insert_manual(conn: db.Executor) -> int:
    """Insert a manual run and return its id."""
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


@dataclasses.dataclass(frozen=True, slots=True)
class RunSummary:
    """A run as a list shows it (when, what kind, who asked, its totals), not its whole report."""

    id: int
    kind: str
    scheduled_for: dt.date | None
    started_at: dt.datetime
    finished_at: dt.datetime | None
    totals: dict[str, int] | None
    exit_code: int | None
    connection_count: int
    requested_by: str | None

    @classmethod
    def from_record(cls, record: models.Row) -> Self:
        return cls(**{f.name: record[f.name] for f in dataclasses.fields(cls)})

    @property
    def duration_s(self) -> float | None:
        return _duration_s(self.started_at, self.finished_at)


@dataclasses.dataclass(frozen=True, slots=True)
class Run:
    """One run with its whole report (per connection)."""

    id: int
    kind: str
    scheduled_for: dt.date | None
    started_at: dt.datetime
    finished_at: dt.datetime | None
    report: dict[str, Any] | None
    requested_by: str | None

    @classmethod
    def from_record(cls, record: models.Row) -> Self:
        return cls(**{f.name: record[f.name] for f in dataclasses.fields(cls)})

    @property
    def duration_s(self) -> float | None:
        return _duration_s(self.started_at, self.finished_at)


async def page(source: db.Executor, *, before: int | None, limit: int) -> list[RunSummary]:
    """Read up to ``limit`` runs newest first, below the id ``before`` when given."""
    with db.translate("list runs"):
        records = await source.fetch(queries.get("console_runs"), before, limit)
    return [RunSummary.from_record(r) for r in records]


async def get(source: db.Executor, run_id: int) -> Run | None:
    with db.translate("read run"):
        record = await source.fetchrow(queries.get("console_run"), run_id)
    return None if record is None else Run.from_record(record)


async def last_scheduled(source: db.Executor) -> Run | None:
    with db.translate("last scheduled run"):
        record = await source.fetchrow(queries.get("last_scheduled_run"))
    if record is None:
        return None
    return Run.from_record({**dict(record), "requested_by": None})


def _duration_s(started_at: dt.datetime, finished_at: dt.datetime | None) -> float | None:
    """The seconds a run took, None while it runs."""
    return None if finished_at is None else (finished_at - started_at).total_seconds()
