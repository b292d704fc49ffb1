"""The ``audit_log`` table, holding every change an operator made in the console and its outcome."""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Self

import asyncpg

from relay import models
from relay.store import db, queries


@dataclasses.dataclass(frozen=True, slots=True)
class Entry:
    """Who (a session's fingerprint) did what to which target, when, and how it ended."""

    id: int
    at: dt.datetime
    who: str
    action: str
    target_kind: str | None
    target: str | None
    outcome: str
    detail: str | None

    @classmethod
    def from_record(cls, record: models.Row) -> Self:
        return cls(**{f.name: record[f.name] for f in dataclasses.fields(cls)})


async def record(
    pool: asyncpg.Pool,
    *,
    who: str,
    action: str,
    target_kind: str | None,
    target: str | None,
    outcome: str,
    detail: str | None = None,
) -> Entry:
    """Append one entry, whose ``outcome`` is ok, refused or failed."""
    with db.translate("audit"):
        row = await pool.fetchrow(
            queries.get("insert_audit"), who, action, target_kind, target, outcome, detail
        )
    assert row is not None  # INSERT ... RETURNING always returns the row
    return Entry.from_record(row)


async def for_target(
    pool: asyncpg.Pool, target_kind: str, target: str | None, *, limit: int = 20
) -> list[Entry]:
    """Read the newest entries about one target (``target`` None reads every target of the kind)."""
    with db.translate("read audit"):
        rows = await pool.fetch(queries.get("audit_for_target"), target_kind, target, limit)
    return [Entry.from_record(r) for r in rows]
