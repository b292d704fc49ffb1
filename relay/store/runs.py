"""The ``runs`` table as the console and the scheduler's requested runs use it."""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any, Self

import asyncpg

from relay import models
from relay.store import db, queries

Source = asyncpg.Pool | db.Conn


@dataclasses.dataclass(frozen=True, slots=True)
class RunSummary:
    """A run in a list: when, what kind, who asked, and its totals (not its whole report)."""

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
        if self.finished_at is None:
            return None
        return (self.finished_at - self.started_at).total_seconds()


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
        if self.finished_at is None:
            return None
        return (self.finished_at - self.started_at).total_seconds()


async def insert_manual(source: Source) -> int:
    """Insert a manual run's row; return its id."""
    with db.translate("insert run"):
        return int(await source.fetchval(queries.get("insert_manual_run")))


async def page(source: Source, *, before: int | None, limit: int) -> list[RunSummary]:
    """Read up to ``limit`` runs newest first, below the id ``before`` when given."""
    with db.translate("list runs"):
        records = await source.fetch(queries.get("console_runs"), before, limit)
    return [RunSummary.from_record(r) for r in records]


async def get(source: Source, run_id: int) -> Run | None:
    with db.translate("read run"):
        record = await source.fetchrow(queries.get("console_run"), run_id)
    return None if record is None else Run.from_record(record)


async def last_scheduled(source: Source) -> Run | None:
    with db.translate("last scheduled run"):
        record = await source.fetchrow(queries.get("last_scheduled_run"))
    if record is None:
        return None
    return Run.from_record({**dict(record), "requested_by": None})
